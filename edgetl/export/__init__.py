"""Exporters: one registered backend per target runtime, all behind :func:`export_bundle`."""

from edgetl.export.bundle import export_bundle
from edgetl.export.registry import EXPORTERS, Exporter, get_exporter, register_exporter

__all__ = ["EXPORTERS", "Exporter", "export_bundle", "get_exporter", "register_exporter"]

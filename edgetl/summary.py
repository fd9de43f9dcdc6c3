"""``summary.json``: what ``edgetl run`` measured, one type for every input kind."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunSummary:
    """What ``edgetl run`` measured; written as ``summary.json``.

    ``kind`` is the recipe's input kind (``timeseries``, ``image``, ``text``); the tables
    (:func:`edgetl.report.run_tables`) and the picture (``plot``) are the same for every kind.
    """

    recipe: str
    kind: str = "timeseries"
    plot: str = "personalisation.png"
    server: dict = field(default_factory=dict)
    bundles: list = field(default_factory=list)   # one dict per exported bundle
    devices: list = field(default_factory=list)   # one row per (bundle, user or device)
    totals: dict = field(default_factory=dict)    # {"by_bundle": {name: ...}, "wall_seconds"}
    protocols: dict = field(default_factory=dict)  # {protocol: rows} beyond the main one
    calibration: dict = field(default_factory=dict)  # the gate chosen on server-val users

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return {"recipe": self.recipe, "kind": self.kind, "server": self.server,
                "bundles": self.bundles, "devices": self.devices, "protocols": self.protocols,
                "totals": self.totals, "calibration": self.calibration}

    def bundle_names(self) -> list[str]:
        """Bundles that have device rows, in the order they ran."""
        return list(dict.fromkeys(r["bundle"] for r in self.devices))

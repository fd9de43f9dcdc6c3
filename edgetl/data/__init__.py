"""Datasets edgetl ships recipes for, all installed offline from packages."""

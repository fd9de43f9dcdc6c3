"""Repository tools that are not part of the ``edgetl`` package (run from the repository root)."""

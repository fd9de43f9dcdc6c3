"""Coverage of architectures written outside edgetl: ``python -m tools.coverage``."""

"""Reproducible performance runs for lazypaged (not part of the tests)."""

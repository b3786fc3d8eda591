"""The package version (its own module so that any module can read it without an import circle)."""

__version__ = "0.1.0"

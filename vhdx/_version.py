"""The package version, in one place (read by the package and by the files we create)."""

__version__ = "0.1.0"

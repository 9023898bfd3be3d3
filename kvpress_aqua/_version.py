"""The package version (provenance stamps import this, never the package's public face)."""

__version__ = "0.1.0"

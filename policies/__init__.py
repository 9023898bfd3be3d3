"""Shipped policy presets (TOML), loadable by name: see kvpress_aqua.spec."""

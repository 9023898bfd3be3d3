"""Where the package keeps the files it makes once and reuses; importable without torch or transformers."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["CACHE_ENV", "cache_dir"]

CACHE_ENV = "KVPRESS_AQUA_CACHE"
"""Environment variable that overrides :func:`cache_dir`."""


def cache_dir() -> Path:
    """Directory for files this package makes once and reuses (the converted default model, for one).

    Returns
    -------
    Path
        ``$KVPRESS_AQUA_CACHE`` if set, else the user cache dir of ``kvpress-aqua`` (``~/.cache/kvpress-aqua``
        on Linux); created if missing.

    """
    override = os.environ.get(CACHE_ENV)
    path = Path(override).expanduser() if override else Path(platformdirs.user_cache_dir("kvpress-aqua"))
    path.mkdir(parents=True, exist_ok=True)
    return path

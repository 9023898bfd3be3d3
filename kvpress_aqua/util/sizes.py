"""Parse and format memory sizes and token counts.

Memory sizes follow the SI/IEC convention strictly, because a planner that confuses the two is
off by 7% at the gigabyte scale:

- decimal units are powers of 1000: ``kB``/``KB``, ``MB``, ``GB``, ``TB``, ``PB``
  (``"8GB"`` is 8 000 000 000 bytes);
- binary units are powers of 1024: ``KiB``, ``MiB``, ``GiB``, ``TiB``, ``PiB``
  (``"24GiB"`` is 25 769 803 776 bytes);
- a bare number, or a number followed by ``B``, is bytes.

Units are case-insensitive, but a unit without its ``B`` (``"8G"``) is refused as ambiguous.

Token counts (context lengths) use the binary convention of model cards instead: ``"128k"`` is
131 072 tokens (the "128k context" of Llama-3.1 is ``max_position_embeddings = 131072``) and
``"1M"`` is 1 048 576. A bare integer is taken as is.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["format_bytes", "parse_size", "parse_tokens"]

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}
_TOKEN_UNITS: dict[str, int] = {"": 1, "k": 2**10, "m": 2**20}
_NUMBER = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*([A-Za-z]*)\s*$")


def _split(text: str) -> tuple[Decimal, str] | None:
    match = _NUMBER.match(text)
    if match is None:
        return None
    try:
        return Decimal(match.group(1)), match.group(2).lower()
    except InvalidOperation:
        return None


def parse_size(text: str | int, what: str = "size") -> int:
    """Parse a memory size into bytes.

    Parameters
    ----------
    text : str or int
        ``"8GB"`` (10^9), ``"24GiB"`` (2^30), ``"1.5 TB"``, ``"512MiB"``, ``"100000000"`` (bytes).
        An int is returned unchanged (after the sign check).
    what : str, default "size"
        What the value is (``"budget"``), for the error messages.

    Returns
    -------
    int
        Bytes, rounded down to a whole byte.

    Raises
    ------
    ValueError
        Naming the bad string and a good example, for malformed, unitless-suffix, zero or negative sizes.

    """
    if isinstance(text, int):
        value, unit = Decimal(text), ""
    else:
        parts = _split(str(text))
        if parts is None or parts[1] not in _SIZE_UNITS:
            hint = ""
            if parts is not None and parts[1] in ("k", "m", "g", "t", "p"):
                unit = parts[1].upper()
                hint = f" ('{unit}' is ambiguous: write {unit}B for powers of 1000 or {unit}iB for powers of 1024)"
            raise ValueError(
                f"cannot read the {what} {text!r}{hint}; write e.g. '8GB' (8*10^9 bytes), '24GiB' (24*2^30) or '512MiB'"
            )
        value, unit = parts
    nbytes = int(value * _SIZE_UNITS[unit])
    if nbytes <= 0:
        raise ValueError(f"the {what} {text!r} must be positive; write e.g. '8GB' or '24GiB'")
    return nbytes


def parse_tokens(text: str | int, what: str = "token count") -> int:
    """Parse a token count; ``k`` is 1024 and ``M`` is 1024^2 (``"128k"`` -> 131072).

    Parameters
    ----------
    text : str or int
        ``"8192"``, ``"128k"``, ``"1.5k"`` (1536), ``"1M"``.
    what : str, default "token count"
        What the value is (``"context"``), for the error messages.

    Returns
    -------
    int
        Tokens, rounded down.

    Raises
    ------
    ValueError
        Naming the bad string and a good example, for malformed, zero or negative counts.

    """
    if isinstance(text, int):
        value, unit = Decimal(text), ""
    else:
        parts = _split(str(text))
        if parts is None or parts[1] not in _TOKEN_UNITS:
            raise ValueError(f"cannot read the {what} {text!r}; write e.g. '8192' or '128k' (k = 1024 tokens)")
        value, unit = parts
    tokens = int(value * _TOKEN_UNITS[unit])
    if tokens <= 0:
        raise ValueError(f"the {what} {text!r} must be at least 1; write e.g. '8192' or '128k'")
    return tokens


def format_bytes(nbytes: int | float, binary: bool = True) -> str:
    """Format a byte count: ``"7.45 GiB"`` (binary, the default) or ``"8.00 GB"`` (decimal).

    Parameters
    ----------
    nbytes : int or float
        Bytes (may be negative for differences).
    binary : bool, default True
        Powers of 1024 with IEC units, or powers of 1000 with SI units.

    Returns
    -------
    str
        Whole bytes below one unit (``"512 B"``), else two decimals.

    """
    base = 1024 if binary else 1000
    units = ("KiB", "MiB", "GiB", "TiB", "PiB") if binary else ("kB", "MB", "GB", "TB", "PB")
    if abs(nbytes) < base:
        return f"{nbytes:.0f} B"
    value = float(nbytes)
    for unit in units:
        value /= base
        if abs(value) < base or unit == units[-1]:
            return f"{value:.2f} {unit}"
    raise AssertionError("unreachable")

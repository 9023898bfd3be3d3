"""Device memory for ``kvtool plan --device-memory``: a size, or the name of a common GPU.

The figures are each card's total memory in MiB as ``nvidia-smi --query-gpu=memory.total`` lists
it (the 80 GB of an H100 are 81,559 MiB); the runtime's own share (CUDA context, allocator) is the
plan's overhead. A size string (``80GB``, ``79GiB``) is taken as given.
"""

from __future__ import annotations

from types import MappingProxyType

from ..util.sizes import parse_size

__all__ = ["GPU_MEMORY_MIB", "parse_device_memory"]

GPU_MEMORY_MIB = MappingProxyType({
    "h100": 81_559,
    "h200": 143_771,
    "a100-40gb": 40_960,
    "a100-80gb": 81_920,
    "l40s": 46_068,
    "l4": 23_034,
    "a10g": 23_028,
    "4090": 24_564,
})
"""GPU name (lower case) -> total memory in MiB (``nvidia-smi`` ``memory.total``)."""
_ALIASES = {"a100": "a100-80gb", "rtx4090": "4090", "rtx-4090": "4090", "h100-80gb": "h100", "h200-141gb": "h200"}


def parse_device_memory(text: str | int) -> tuple[int, str]:
    """``(bytes, label)`` of a ``--device-memory`` value: a GPU name of :data:`GPU_MEMORY_MIB` or a size.

    Parameters
    ----------
    text : str or int
        ``"h100"``, ``"A100-40GB"``, ``"80GB"``, ``"79GiB"`` or bytes.

    Returns
    -------
    tuple
        The bytes and how to show them (``"h100 (81,559 MiB)"``, or the size as typed).

    Raises
    ------
    ValueError
        For a string that is neither a known GPU nor a size, naming both kinds of answer.

    """
    name = str(text).strip().lower()
    name = _ALIASES.get(name, name)
    if name in GPU_MEMORY_MIB:
        mib = GPU_MEMORY_MIB[name]
        return mib * 2**20, f"{name} ({mib:,} MiB)"
    try:
        return parse_size(text, "device memory"), str(text)
    except ValueError as err:
        raise ValueError(f"{err}, or a GPU name: {', '.join(GPU_MEMORY_MIB)}") from None

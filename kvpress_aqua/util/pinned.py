"""Page-locked host tensors that lock exactly their own bytes.

``torch.empty(..., pin_memory=True)`` takes its memory from CUDA's caching host allocator, which
rounds every block up to a power of two: a 1.34 GB tier block locks 2 GiB, and a retrieval tier of
86 GB asks for 128 GB of page-locked memory, more than a 125 GiB host has (measured on the lent
H200 host: batch 20 x 32k of the Llama-3.1-8B shape could not fill its tier). :func:`pinned_zeros`
instead takes ordinary pageable memory and locks the pages the tensor covers with
``cudaHostRegister``; the pages are unlocked (``cudaHostUnregister``) when the last tensor over
them is freed. Such memory is pinned for CUDA (``Tensor.is_pinned()`` is true, copies to the GPU
run at full speed and may be asynchronous) and, on devices with unified addressing, readable by
the GPU at its host address.
"""

from __future__ import annotations

import math
import mmap
import weakref

import torch

__all__ = ["pinned_copy", "pinned_zeros"]

_PAGE = mmap.PAGESIZE


def _cudart():
    return torch.cuda.cudart()


def _check(error: object, call: str) -> None:
    code = int(getattr(error, "value", error))
    if code != 0:
        raise RuntimeError(f"{call} failed with CUDA error {code} ({error}): the host may be out of lockable "
                           "memory; lower the batch or the context, or raise the memlock limit (ulimit -l)")


def _unregister(address: int) -> None:
    _check(_cudart().cudaHostUnregister(address), "cudaHostUnregister")


def pinned_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed host tensor of ``shape`` whose pages are locked with ``cudaHostRegister``.

    Parameters
    ----------
    shape : tuple of int
        The tensor's shape.
    dtype : torch.dtype
        Its element type.

    Returns
    -------
    torch.Tensor
        A contiguous CPU tensor. Its pages (its bytes rounded out to whole pages, one page more at
        most) are locked until the last tensor over its storage is freed. An empty shape gives an
        ordinary empty tensor (there is nothing to lock).

    Raises
    ------
    RuntimeError
        When CUDA cannot lock the pages (no CUDA device, or the host's lockable memory is spent).

    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.zeros(nbytes + _PAGE, dtype=torch.uint8)
    skip = -raw.data_ptr() % _PAGE
    pages = raw.numpy()[skip:skip + nbytes]  # a page-aligned view; it keeps ``raw`` alive
    address = pages.ctypes.data
    _check(_cudart().cudaHostRegister(address, nbytes, 0), "cudaHostRegister")
    # numpy runs an array's weak-reference callbacks before it releases the array's base, so the
    # pages are unlocked while they are still mapped; the tensor below keeps ``pages`` alive.
    weakref.finalize(pages, _unregister, address).atexit = False  # at exit the process unlocks all
    return torch.from_numpy(pages).view(dtype).view(shape)


def pinned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` (on any device) in host memory locked by :func:`pinned_zeros`."""
    out = pinned_zeros(tuple(tensor.shape), tensor.dtype)
    out.copy_(tensor)
    return out

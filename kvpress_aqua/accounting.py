"""The byte formulas of the cache's storage, shared by the cache's reports and the planner.

The cache measures its own tensors (``CompressedCache.nbytes``); these formulas predict the same
numbers from shapes alone, and the tests hold the two equal. Layout per compressed layer, with
``B`` sequences, ``H`` KV heads and ``S`` slots:

======== ===================== =====================================
tensor   shape                 bytes
======== ===================== =====================================
keys     ``(B, H, S, d_k)``    ``d_k`` stored key channels x dtype
values   ``(B, H, S, d_v)``    ``d_v`` value channels x dtype
residual ``(B, H, E, d-d_k)``  AQUA's exact tokens (``E`` = sinks + recent): dropped key channels x dtype
exact    ``(B, H, E)``         int64: 8, the slot of each exact token (with ``residual`` only)
index    ``(B, H, S)``         int32: 4
valid    ``(B, H, S)``         bool: 1
score    ``(B, H, S)``         float32: 4, only for policies that read scores (H2O)
start    ``(B, 1, 1)``         int32: 4 per sequence (left-padding count)
======== ===================== =====================================

A layer with no policy at all is stored exactly as ``transformers``' ``DynamicCache`` stores it
(keys and values only).
"""

from __future__ import annotations

import torch

__all__ = [
    "DTYPE_BYTES",
    "EXACT_SLOT_BYTES",
    "INDEX_BYTES",
    "SCORE_BYTES",
    "VALID_BYTES",
    "decode_slots",
    "dense_layer_tokens",
    "layer_nbytes",
    "slot_nbytes",
]

INDEX_BYTES = 4
VALID_BYTES = 1
SCORE_BYTES = 4
START_BYTES = 4
EXACT_SLOT_BYTES = 8

DTYPE_BYTES: dict[str, int] = {
    "fp32": 4,
    "float32": 4,
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "fp8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}


def dtype_bytes(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype or a dtype name (``bf16``, ``float32``...)."""
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    try:
        return DTYPE_BYTES[dtype.lower()]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPE_BYTES))}"
        ) from None


def slot_nbytes(key_dim: int, value_dim: int, elem: int, needs_scores: bool) -> int:
    """Bytes of one slot of one KV head in a compressed layer (keys, values and metadata)."""
    return (key_dim + value_dim) * elem + INDEX_BYTES + VALID_BYTES + (SCORE_BYTES if needs_scores else 0)


def decode_slots(budget: int | None, seen: int, window: int | None = None) -> int:
    """Slots a compressed layer holds during decoding, after ``seen`` tokens.

    Parameters
    ----------
    budget : int or None
        The token policy's budget; ``None`` for no eviction.
    seen : int
        Tokens fed through the cache so far, the token being decoded included.
    window : int or None
        The model's own sliding window for this layer: tokens older than ``window - 1`` can never be
        attended again, so the layer's budget is capped at ``window - 1``.

    Returns
    -------
    int
        With a budget, the preallocated ``budget + 1`` slots (budget plus the new token), whatever
        ``seen`` is; without one, ``seen``.

    """
    if window is not None:
        budget = window - 1 if budget is None else min(budget, window - 1)
    if budget is None:
        return seen
    return budget + 1


def dense_layer_tokens(seen: int, window: int | None = None) -> int:
    """Tokens ``DynamicCache`` holds for a layer after ``seen`` tokens (sliding layers keep ``window - 1``)."""
    return seen if window is None else min(seen, window - 1)


def layer_nbytes(
    batch: int,
    kv_heads: int,
    slots: int,
    key_dim: int,
    value_dim: int,
    elem: int,
    *,
    compressed: bool,
    needs_scores: bool = False,
    exact_tokens: int = 0,
    residual_dim: int = 0,
) -> int:
    """Bytes one layer holds: keys, values and, for a compressed layer, its per-slot metadata.

    ``exact_tokens`` (AQUA's ``exact_sinks + exact_recent``) tokens per sequence and KV head also
    keep their ``residual_dim = head_dim - key_dim`` dropped key channels and their slot; a layer
    that drops no channel (``residual_dim = 0``) holds neither.
    """
    if not compressed:
        return batch * kv_heads * slots * (key_dim + value_dim) * elem
    per_slot = slot_nbytes(key_dim, value_dim, elem, needs_scores)
    exact = exact_tokens * (residual_dim * elem + EXACT_SLOT_BYTES) if residual_dim else 0
    return batch * kv_heads * (slots * per_slot + exact) + batch * START_BYTES

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

from typing import Any

__all__ = [
    "DTYPE_BYTES",
    "EXACT_SLOT_BYTES",
    "INDEX_BYTES",
    "SCORE_BYTES",
    "VALID_BYTES",
    "GROWTH_DIVISOR",
    "GROWTH_MIN",
    "capped_budget",
    "decode_slots",
    "dense_layer_tokens",
    "grown_capacity",
    "layer_nbytes",
    "prefill_slots",
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


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a dtype name (``bf16``, ``float32``...) or a dtype object.

    A dtype object (``torch.bfloat16``, ``numpy.float16``...) is read by duck typing, without importing
    torch: its ``itemsize``, else its name (``str(dtype)`` without the ``torch.`` prefix).

    Raises
    ------
    ValueError
        For a name not in :data:`DTYPE_BYTES`, listing the accepted names.

    """
    if not isinstance(dtype, str):
        itemsize = getattr(dtype, "itemsize", None)
        if isinstance(itemsize, int) and not isinstance(itemsize, bool):
            return itemsize
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    try:
        return DTYPE_BYTES[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPE_BYTES))}"
        ) from None


def slot_nbytes(key_dim: int, value_dim: int, elem: int, needs_scores: bool) -> int:
    """Bytes of one slot of one KV head in a compressed layer (keys, values and metadata)."""
    return (key_dim + value_dim) * elem + INDEX_BYTES + VALID_BYTES + (SCORE_BYTES if needs_scores else 0)


GROWTH_MIN = 16
"""Fewest empty slots a decode buffer grows by (see :func:`grown_capacity`)."""
GROWTH_DIVISOR = 16
"""A decode buffer grows by at least ``1 / GROWTH_DIVISOR`` of its size (amortized copies)."""


def capped_budget(budget: int | None, window: int | None = None) -> int | None:
    """A layer's token budget: the policy's, capped at ``window - 1`` on the model's sliding-window layers.

    Tokens older than ``window - 1`` can never be attended again there, so the layer never holds more.
    """
    if window is None:
        return budget
    return window - 1 if budget is None else min(budget, window - 1)


def grown_capacity(capacity: int, budget: int) -> int:
    """Slots of a full decode buffer after it grows.

    It grows by ``max(GROWTH_MIN, capacity // GROWTH_DIVISOR)`` slots, to at most ``budget + 1``.

    A layer decoding with fewer tokens than its budget never holds a buffer larger than the tokens
    it has seen plus this step, so a budget larger than the sequence costs no more than the tokens.
    """
    return min(budget + 1, capacity + max(GROWTH_MIN, capacity // GROWTH_DIVISOR))


def prefill_slots(budget: int | None, prompt: int, chunk: int | None = None) -> int:
    """Slots a compressed layer holds once a prompt of ``prompt`` tokens was fed and its last chunk folded in.

    Each chunk is appended after at most ``budget`` held slots; a chunk that leaves more than
    ``budget + 1`` slots is evicted down to ``budget`` right after it was attended.
    """
    if budget is None:
        return prompt
    chunk = prompt if chunk is None else min(chunk, prompt)
    last = prompt - chunk * ((prompt - 1) // chunk)
    held = min(prompt - last, budget) + last
    return budget if held > budget + 1 else held


def decode_slots(
    budget: int | None, seen: int, window: int | None = None, *, prompt: int, chunk: int | None = None
) -> int:
    """Slots a compressed layer holds during decoding, after ``seen`` tokens.

    Parameters
    ----------
    budget : int or None
        The token policy's budget; ``None`` for no eviction.
    seen : int
        Tokens fed through the cache so far, the token being decoded included.
    window : int or None
        The model's own sliding window for this layer (the budget is capped at ``window - 1``).
    prompt : int
        Tokens of the prompt fed before decoding began.
    chunk : int, optional
        The prompt's prefill chunk (default: the whole prompt in one forward).

    Returns
    -------
    int
        Without a budget, ``seen``. With one, the decode buffer: the slots held after the prompt
        (:func:`prefill_slots`), grown by :func:`grown_capacity` whenever every slot is taken, up to
        the static ``budget + 1`` (budget plus the new token).

    """
    budget = capped_budget(budget, window)
    if budget is None:
        return seen
    used = capacity = prefill_slots(budget, prompt, chunk)
    steps = seen - prompt
    while steps > 0 and capacity < budget + 1:
        if used == capacity:
            capacity = grown_capacity(capacity, budget)
        taken = min(steps, capacity - used)
        used, steps = used + taken, steps - taken
    return capacity


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

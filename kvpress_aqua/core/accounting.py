"""The byte formulas of the cache's storage, shared by the cache's reports and the planner.

The cache measures its own tensors (``CompressedCache.nbytes``); these formulas predict the same
numbers from shapes alone, and the tests hold the two equal. Layout per compressed layer, with
``B`` sequences, ``H`` KV heads and ``S`` slots:

========== ===================== =====================================
tensor     shape                 bytes
========== ===================== =====================================
keys       ``(B, H, S, d_k)``    ``d_k`` stored key channels x dtype
values     ``(B, H, S, d_v)``    ``d_v`` value channels x dtype
exact_keys ``(B, H, E, d-d_k)``  AQUA's exact tokens (``E`` = sinks + recent): dropped key channels x dtype
exact_slot ``(B, H, E)``         int64: 8, the slot of each exact token (with ``exact_keys`` only)
index      ``(B, H, S)``         int32: 4
valid      ``(B, H, S)``         bool: 1
score      ``(B, H, S)``         float32: 4, only for policies that read scores (H2O, TOVA, SnapKV)
log_weight ``(B, H, S)``         float32: 4, only for policies whose slots stand for several tokens (BalanceKV, Uniform)
left_pad   ``(B, 1, 1)``         int32: 4 per sequence (left-padding count)
========== ===================== =====================================

A static layer (``CompressedCache.make_static``) with exact tokens holds one exact row more (the
token decoded last, written at the next step): ``E + 1`` in the formulas.

A layer with no policy at all is stored exactly as ``transformers``' ``DynamicCache`` stores it
(keys and values only). :func:`kv_fraction_budget` turns a fraction of the dense KV bytes (a spec's
``kv_fraction``) into a token budget.
"""

from __future__ import annotations

import math

__all__ = [
    "EXACT_SLOT_BYTES",
    "INDEX_BYTES",
    "LOG_WEIGHT_BYTES",
    "SCORE_BYTES",
    "VALID_BYTES",
    "GROWTH_DIVISOR",
    "GROWTH_MIN",
    "capped_budget",
    "decode_slots",
    "dense_layer_tokens",
    "grown",
    "grown_capacity",
    "kv_fraction_budget",
    "layer_nbytes",
    "prefill_slots",
    "slot_nbytes",
]

INDEX_BYTES = 4
VALID_BYTES = 1
SCORE_BYTES = 4
LOG_WEIGHT_BYTES = 4
START_BYTES = 4
EXACT_SLOT_BYTES = 8

def slot_nbytes(key_dim: int, value_dim: int, elem: int, needs_scores: bool, weighted: bool = False) -> int:
    """Bytes of one slot of one KV head in a compressed layer (keys, values and metadata)."""
    meta = INDEX_BYTES + VALID_BYTES + (SCORE_BYTES if needs_scores else 0) + (LOG_WEIGHT_BYTES if weighted else 0)
    return (key_dim + value_dim) * elem + meta


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


def grown(capacity: int) -> int:
    """Rows of a full, growing buffer after one growth: ``max(GROWTH_MIN, capacity // GROWTH_DIVISOR)`` more.

    Decode buffers (capped by :func:`grown_capacity`) and retrieval tiers (uncapped) grow this way.
    """
    return capacity + max(GROWTH_MIN, capacity // GROWTH_DIVISOR)


def grown_capacity(capacity: int, budget: int) -> int:
    """Slots of a full decode buffer after it grows.

    It grows by ``max(GROWTH_MIN, capacity // GROWTH_DIVISOR)`` slots, to at most ``budget + 1``.

    A layer decoding with fewer tokens than its budget never holds a buffer larger than the tokens
    it has seen plus this step, so a budget larger than the sequence costs no more than the tokens.
    """
    return min(budget + 1, grown(capacity))


def _appended(prompt: int, chunk: int | None) -> int:
    """Tokens of a prompt that a budgeted layer appends as chunks (the rest it takes as decode steps).

    A budgeted layer stores a 1-token update in its decode buffer whatever fed it
    (:meth:`~kvpress_aqua.core.layer.CompressedLayer.update` cannot tell a prompt's 1-token chunk from a
    decode step): a chunk of 1 means every prompt token is a decode step, and a last chunk of one
    token (``prompt % chunk == 1``, a 1-token prompt) makes that token the first decode step.
    """
    chunk = prompt if chunk is None else min(chunk, prompt)
    if chunk <= 1:
        return 0
    last = prompt - chunk * ((prompt - 1) // chunk)
    return prompt - 1 if last == 1 else prompt


def _chunked_slots(budget: int, prompt: int, chunk: int | None) -> int:
    """Slots after ``prompt`` tokens appended in chunks of ``chunk`` (each chunk longer than one token)."""
    if prompt == 0:
        return 0
    chunk = prompt if chunk is None else min(chunk, prompt)
    last = prompt - chunk * ((prompt - 1) // chunk)
    held = min(prompt - last, budget) + last
    return budget if held > budget + 1 else held


def _decode_buffer(budget: int, used: int, steps: int) -> int:
    """Slots of a decode buffer holding ``used`` tokens in ``used`` slots after ``steps`` decode steps."""
    capacity = used
    while steps > 0 and capacity < budget + 1:
        if used == capacity:
            capacity = grown_capacity(capacity, budget)
        taken = min(steps, capacity - used)
        used, steps = used + taken, steps - taken
    return capacity


def prefill_slots(budget: int | None, prompt: int, chunk: int | None = None) -> int:
    """Slots a compressed layer holds once a prompt of ``prompt`` tokens was fed and its last chunk folded in.

    Each chunk is appended after at most ``budget`` held slots; a chunk that leaves more than
    ``budget + 1`` slots is evicted down to ``budget`` right after it was attended. With a budget, a
    chunk of a single token is a decode step (see :func:`decode_slots`): a prompt fed one token at a
    time (``chunk=1``, or a 1-token prompt) fills a decode buffer from empty, and a last chunk of one
    token (``prompt % chunk == 1``) is the first step of the buffer that the decode steps then fill, so
    the layer holds up to one growth step (:func:`grown_capacity`) more than the tokens: the slots the
    first decode step would have allocated anyway.
    """
    if budget is None:
        return prompt
    appended = _appended(prompt, chunk)
    return _decode_buffer(budget, _chunked_slots(budget, appended, chunk), prompt - appended)


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
        Without a budget, ``seen``. With one, the decode buffer: the slots held after the prompt's
        appended chunks, grown by :func:`grown_capacity` whenever every slot is taken, up to the static
        ``budget + 1`` (budget plus the new token). A prompt chunk of one token (``chunk=1``, a 1-token
        prompt, or ``prompt % chunk == 1``) is a decode step of that buffer already, as the layer
        stores it (:func:`prefill_slots`).

    """
    budget = capped_budget(budget, window)
    if budget is None:
        return seen
    appended = _appended(prompt, chunk)
    return _decode_buffer(budget, _chunked_slots(budget, appended, chunk), seen - appended)


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
    weighted: bool = False,
) -> int:
    """Bytes one layer holds: keys, values and, for a compressed layer, its per-slot metadata.

    ``weighted`` layers (policies that keep weighted summaries) hold a float32 log-weight per slot.

    ``exact_tokens`` (AQUA's ``exact_sinks + exact_recent``) tokens per sequence and KV head also
    keep their ``residual_dim = head_dim - key_dim`` dropped key channels and their slot; a layer
    that drops no channel (``residual_dim = 0``) holds neither.
    """
    if not compressed:
        return batch * kv_heads * slots * (key_dim + value_dim) * elem
    per_slot = slot_nbytes(key_dim, value_dim, elem, needs_scores, weighted)
    exact = exact_tokens * (residual_dim * elem + EXACT_SLOT_BYTES) if residual_dim else 0
    return batch * kv_heads * (slots * per_slot + exact) + batch * START_BYTES


def kv_fraction_budget(kv_fraction: float, context: int, k_ratio: float = 1.0, exact_tokens: int = 0) -> int:
    """The token budget whose keys and values take ``kv_fraction`` of the dense KV bytes of ``context`` tokens.

    A dense token holds ``d`` key and ``d`` value channels; one stored with ``k_ratio * d`` key
    channels costs ``(k_ratio + 1) / 2`` of it (values are never pruned). Each of AQUA's
    ``exact_tokens`` (``exact_sinks + exact_recent``, kept whatever the context) also keeps its
    dropped key channels, ``(1 - k_ratio) / 2`` of a dense token. Slot metadata is not counted:
    ``kv_fraction`` is a fraction of the bytes of keys and values.

    Parameters
    ----------
    kv_fraction : float
        Fraction of the dense KV bytes to keep, in ``(0, 1]``.
    context : int
        Tokens the dense cache would hold.
    k_ratio : float, default 1.0
        Fraction of key channels the channel policy stores (1: no pruning).
    exact_tokens : int, default 0
        AQUA's exact tokens per layer and KV head (0 when no channel is dropped).

    Returns
    -------
    int
        Tokens per layer, KV head and sequence, rounded down, at least 2 (a sink and one more).

    """
    dropped = exact_tokens * (1 - k_ratio) / 2
    return max(2, math.floor((kv_fraction * context - dropped) * 2 / (k_ratio + 1)))

"""The slots each layer holds at the moments of a run that can be its peak, and at its end.

:class:`~kvpress_aqua.planner.memory.MemoryModel` turns these slot counts into bytes. A
compressed cache finalizes its layers one after the other (a layer folds in its attention's results,
evicts or compacts, when the next layer updates), so while one layer attends a forward of ``n``
tokens it holds its old slots plus the ``n`` new ones, the layers before it hold what they kept of
this forward, and the layers after it what they kept of the previous one.

- :func:`budget_steps`: a token policy with a budget (or none, or AQUA alone): the last prefill
  chunk, the last full one, and the last decode step can hold the most (what a layer holds grows
  with the tokens seen, up to its budget);
- :func:`summary_steps`: a block-summary policy (BalanceKV, uniform sampling): a layer holds
  :func:`~kvpress_aqua.planner.summaries.summary_slots`, which drops whenever a block is reduced, so
  the peak is searched over every chunk and decode step that can hold the most
  (:func:`~kvpress_aqua.planner.summaries.last_starts`, :func:`~kvpress_aqua.planner.summaries.maximal`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..core.accounting import capped_budget, decode_slots, dense_layer_tokens, prefill_slots
from .retrieval import TierMoment
from .summaries import last_starts, maximal, summary_slots

__all__ = ["Phase", "Step", "budget_steps", "sdpa_masked", "summary_steps"]


@dataclass(frozen=True)
class Step:
    """One moment of a run: a forward of ``chunk`` tokens at ``offset``, and the slots every layer holds.

    Attributes
    ----------
    name : {"prefill", "decode"}
        The phase.
    offset, chunk : int
        Tokens seen before the forward, and its tokens.
    slots : tuple of int
        Slots each layer holds at that moment (per sequence and KV head).
    visible : tuple of int
        Slots each layer's attention sees (its past and the new tokens).
    copy : int or None
        Slots of the attending layer's old tensors, alive until its ``torch.cat`` is done; ``None``:
        its visible slots.

    """

    name: str
    offset: int
    chunk: int
    slots: tuple[int, ...]
    visible: tuple[int, ...]
    copy: int | None = None


@dataclass(frozen=True)
class Phase:
    """The bytes of one :class:`Step` (:meth:`~kvpress_aqua.planner.memory.MemoryModel.evaluate` builds it).

    ``kv`` is the KV held, ``attention``, ``activations`` and ``copy`` the working set of the larger
    of the layer's two steps (``step``: ``"attention"`` or ``"mlp"``); ``scores`` the attention term
    at the attention step, ``copy_slots`` the slots copied, ``tier`` a retrieval tier's bytes.
    """

    name: str
    chunk: int
    offset: int
    slots: tuple[int, ...]
    visible: tuple[int, ...]
    kv: int
    attention: int
    activations: int
    copy: int
    copy_slots: int
    step: str
    scores: int
    tier: TierMoment | None = None

    @property
    def peak(self) -> int:
        """KV held plus the working set."""
        return self.kv + self.attention + self.activations + self.copy


def _chunk(context: int, prefill_chunk: int | None) -> tuple[int, int]:
    """``(tokens per chunk, full chunks before the last)`` of a prompt."""
    chunk = min(prefill_chunk or context, context)
    return chunk, (context - 1) // chunk


def budget_steps(windows: Sequence[int | None], context: int, prefill_chunk: int | None, new_tokens: int,
                 budget: int | None, compressed: bool, layer: Callable[[int], int]) -> tuple[list[Step], Step]:
    """The steps that can be the peak of a budgeted (or uncompressed) cache, and its end.

    Parameters
    ----------
    windows : sequence of int or None
        The model's own sliding window per layer.
    context, prefill_chunk, new_tokens : int
        The prompt, its chunk (``None``: one forward) and the tokens generated.
    budget : int or None
        The token budget (``None``: every token, up to a layer's window).
    compressed : bool
        Whether the layers are compressed (a budget or AQUA); else they are ``DynamicCache`` layers.
    layer : callable
        Bytes of one layer holding a number of slots (picks the layer whose chunk weighs most).

    Returns
    -------
    tuple
        The steps, and the end: what ``CompressedCache.nbytes()`` measures after the prompt and
        ``new_tokens - 1`` decode steps.

    """
    chunk, full = _chunk(context, prefill_chunk)
    last_lo = full * chunk
    chunks = [(last_lo, context - last_lo)]
    if context - last_lo < chunk and last_lo >= chunk:
        chunks.append((last_lo - chunk, chunk))
    steps = []
    budgeted = budget is not None or any(w is not None for w in windows)
    for lo, n in chunks:
        if compressed and n == 1 and budgeted:
            # a 1-token chunk is a decode step of a budgeted layer (its decode buffer, up to one growth
            # step more than the tokens): every layer holds what prefill_slots says, no eviction follows
            slots = tuple(prefill_slots(capped_budget(budget, w), lo + 1, prefill_chunk) for w in windows)
            steps.append(Step("prefill", lo, n, slots, slots))
        elif compressed:
            # While the last layer attends the chunk, the others already hold their evicted size, and its
            # old tensors live on until the cat is done.
            caps = [capped_budget(budget, w) for w in windows]
            before = [lo if c is None else min(lo, c) for c in caps]
            during = [x + n for x in before]
            after = [x if c is None or x <= c + 1 else c for x, c in zip(during, caps, strict=True)]
            grows = max(range(len(caps)), key=lambda i: layer(during[i]) - layer(after[i]))
            slots = tuple(during[i] if i == grows else after[i] for i in range(len(caps)))
            steps.append(Step("prefill", lo, n, slots, tuple(during), before[grows]))
        else:
            slots = tuple(dense_layer_tokens(lo + n, w) for w in windows)
            steps.append(Step("prefill", lo, n, slots, slots))
    seen = context + max(new_tokens - 1, 0)
    end = steps[0]
    if new_tokens >= 2:
        slots = tuple(decode_slots(budget, seen, w, prompt=context, chunk=prefill_chunk) if compressed
                      else dense_layer_tokens(seen, w) for w in windows)
        end = Step("decode", seen - 1, 1, slots, slots)
        steps.append(end)
    elif compressed:  # what nbytes() reports after the prompt: an overfilled last chunk is evicted at once
        slots = tuple(prefill_slots(capped_budget(budget, w), context, prefill_chunk) for w in windows)
        end = Step(end.name, end.offset, end.chunk, slots, end.visible, end.copy)
    return steps, end


def summary_steps(layers: int, context: int, prefill_chunk: int | None, new_tokens: int,
                  halvings: int) -> tuple[list[Step], Step]:
    """The steps that can be the peak of a block-summary cache (no sliding layers), and its end.

    Every forward appends (the policy has no budget, so a decode step is a chunk of one token),
    then the layer reduces the blocks it completed. While layer ``i`` attends ``n`` tokens at
    offset ``lo`` it holds ``h(lo) + n`` slots, the layers before it ``h(lo + n)`` and the layers
    after it ``h(lo)`` (``h = summary_slots(., halvings)``): at most ``h(lo) + n`` and ``layers - 1``
    times ``max(h(lo), h(lo + n))``, the first or the last layer attending. Of the full prefill
    chunks, the last one and the decode steps, only those that hold the most are returned.

    Parameters
    ----------
    layers : int
        Decoder layers.
    context, prefill_chunk, new_tokens : int
        The prompt, its chunk (``None``: one forward) and the tokens generated.
    halvings : int
        The policy's halvings.

    Returns
    -------
    tuple
        The steps, and the end: every layer holding ``h(context + new_tokens - 1)`` slots.

    """
    chunk, full = _chunk(context, prefill_chunk)
    seen = context + max(new_tokens - 1, 0)
    families = [("prefill", last_starts(0, chunk, full), chunk),
                ("prefill", range(full * chunk, full * chunk + 1), context - full * chunk)]
    if new_tokens >= 2:
        families.append(("decode", last_starts(context, 1, seen - context), 1))
    steps = []
    for name, starts, n in families:
        pairs = []
        for lo in starts:
            before = summary_slots(lo, halvings)
            others = max(before, summary_slots(lo + n, halvings))
            pairs.append((before, others, (lo, before, others)))
        for lo, before, others in maximal(pairs):
            slots = (before + n,) + (others,) * (layers - 1)
            steps.append(Step(name, lo, n, slots, slots, before))
    held = (summary_slots(seen, halvings),) * layers
    last = steps[-1]
    return steps, Step("decode" if new_tokens >= 2 else "prefill", last.offset, last.chunk, held, held)


def sdpa_masked(phase: str, offset: int) -> bool:
    """Whether ``transformers``' SDPA path builds an explicit boolean mask (``B x n x held`` bytes).

    It does for a prefill chunk after the first (its keys are longer than its queries); the first
    chunk and decode steps run with ``is_causal`` and no mask. With a mask, under GQA/MQA, it also
    expands K and V to every query head (``repeat_kv``).
    """
    return phase == "prefill" and offset > 0


"""Fitting a budget: the key widths considered, the largest token budget that fits, and what would fit.

:func:`largest_budget` bisects the token budget of one key width against a memory limit (memory
grows with the budget); :func:`does_not_fit` explains, when no point fits, what does: the cheapest
point's bytes against the limit, and the largest context, batch or a prefill chunk that would fit.
:func:`kvpress_aqua.planner.search.plan` uses both.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from ..util.sizes import format_bytes
from .memory import Breakdown, MemoryModel

__all__ = ["MIN_K_RATIO", "candidate_key_dims", "does_not_fit", "largest_budget"]

MIN_K_RATIO = 0.25
"""Smallest ``k_ratio`` considered: below a quarter of the channels the prototype's perplexity exploded."""
_CHUNK_HINTS = (8192, 4096, 2048, 1024, 512, 256, 128)
"""Prefill chunks :func:`does_not_fit` tries, largest first."""


def candidate_key_dims(head_dim: int) -> list[int]:
    """Stored key widths considered, widest first.

    Multiples of 8 (16 for ``head_dim >= 128``) from ``MIN_K_RATIO * head_dim`` up to ``head_dim``:
    ``64 -> 64, 56, ..., 16`` (k_ratio 1 to 0.25), ``128 -> 128, 112, ..., 32``.
    """
    step = 16 if head_dim >= 128 else 8
    low = math.ceil(head_dim * MIN_K_RATIO)
    dims = {c for c in range(step, head_dim + 1, step) if c >= low} | {head_dim}
    return sorted(dims, reverse=True)


def largest_budget(mm: MemoryModel, key_dim: int, limit: int, lowest: int) -> tuple[bool, int | None]:
    """``(fits, budget)``: every token (``None``) if that fits, else the largest budget in ``[lowest, seen - 2]``.

    When nothing fits, the budget returned is the cheaper of every token and ``lowest``.
    """
    keep_all = mm.evaluate(key_dim, None).total
    if keep_all <= limit:
        return True, None
    lo, hi = lowest, mm.seen - 2
    if hi < lo:
        return False, None
    if mm.evaluate(key_dim, lo).total > limit:
        return False, lo if mm.evaluate(key_dim, lo).total < keep_all else None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mm.evaluate(key_dim, mid).total <= limit:
            lo = mid
        else:
            hi = mid - 1
    return True, lo


def _smallest_budget(mm: MemoryModel, min_tokens: int) -> int | None:
    return min_tokens if mm.seen - 2 >= min_tokens else None


def _cheapest(mm: MemoryModel, min_tokens: int) -> tuple[int, int | None, Breakdown]:
    """The smallest-memory point: any key width, keeping every token or the smallest budget considered.

    Keeping every token can be the cheaper of the two: a plain ``DynamicCache`` has no slot metadata
    and the model's fused attention materializes no score matrix.
    """
    budgets = {None, _smallest_budget(mm, min_tokens)}
    points = [(k, b, mm.evaluate(k, b)) for k in candidate_key_dims(mm.shape.info.head_dim) for b in budgets]
    return min(points, key=lambda p: p[2].total)


def _largest(fits: Any, top: int) -> int:
    """Largest ``x`` in ``[1, top]`` with ``fits(x)`` (monotone), 0 if none."""
    if top < 1 or not fits(1):
        return 0
    lo, hi = 1, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def does_not_fit(mm: MemoryModel, budget: int, min_tokens: int) -> str:
    """Why nothing fits ``budget``, and what would: the largest context, batch, or a prefill chunk.

    The cheapest point (any key width, every token or ``min_tokens``) is set against the budget;
    when the weights and overhead alone exceed it, the message says so instead.
    """
    key_dim, tokens, need = _cheapest(mm, min_tokens)
    k_ratio = key_dim / mm.shape.info.head_dim
    held = f"all {mm.seen:,} tokens" if tokens is None else f"{tokens} tokens"
    fixed = need.weights + need.overhead
    head = (f"does not fit: needs {format_bytes(need.total)} ({need.total:,} B) even at k_ratio {k_ratio:g} "
            f"keeping {held}, you have {format_bytes(budget)} ({budget:,} B)")
    if fixed >= budget:
        return (f"{head}; the weights alone need {format_bytes(need.weights)} plus {format_bytes(need.overhead)} "
                "overhead, so no context or batch fits: use a smaller dtype (--dtype fp8), a smaller model or "
                "more memory")

    def fits_with(**changes: Any) -> bool:
        return _cheapest(replace(mm, **changes), min_tokens)[2].total <= budget

    context = _largest(lambda c: fits_with(context=c), mm.context - 1)
    parts = [f"the largest context that fits at batch {mm.batch} is {context:,} tokens" if context
             else f"no context fits at batch {mm.batch}"]
    if mm.batch > 1:
        batch = _largest(lambda b: fits_with(batch=b), mm.batch - 1)
        parts.append(f"the largest batch that fits at {mm.context:,} tokens is {batch}" if batch
                     else f"not even batch 1 fits at {mm.context:,} tokens")
    current = mm.prefill_chunk or mm.context
    chunk = next((c for c in _CHUNK_HINTS if c < min(current, mm.context) and fits_with(prefill_chunk=c)), None)
    if chunk:
        parts.append(f"with --prefill-chunk {chunk} the full request fits")
    return f"{head}; " + "; ".join(parts)

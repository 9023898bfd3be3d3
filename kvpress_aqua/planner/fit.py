"""Fitting the limits: the key widths and prefill chunks considered, the largest token budget that fits, and what would.

A plan point fits :class:`Limits`: the KV-cache budget (the most the cache holds at once on the
device: keys, values, slot metadata and AQUA's projections,
:attr:`~kvpress_aqua.planner.breakdown.Breakdown.cache_peak`), when given the device memory
(weights, cache, the prefill or decode working set and the overhead,
:attr:`~kvpress_aqua.planner.breakdown.Breakdown.total`) and, for a retrieval cache whose tier is
offloaded, the host budget (:attr:`~kvpress_aqua.planner.breakdown.Breakdown.host_peak`).
:func:`largest_knob` bisects the token budget (or a block summary's halvings, or retrieval's
``top_k``) of one key width and prefill chunk (memory grows with it); :func:`best_chunk` picks, for
one key width, the prefill chunk of :data:`CHUNK_CHOICES` whose largest knob has the best estimated
quality; :func:`does_not_fit` explains, when no point fits, what
does: the cheapest point against the limit it exceeds, and the largest context and batch that would fit;
:func:`binding` says which limit (and which tier) stops a recommendation from keeping more.
:func:`kvpress_aqua.planner.search.plan` uses them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..util.sizes import format_bytes
from .breakdown import Breakdown
from .memory import MemoryModel
from .points import Candidate, run_of
from .retrieval import proxy_ranks

__all__ = [
    "CHUNK_CHOICES",
    "MIN_K_RATIO",
    "Limits",
    "best_chunk",
    "binding",
    "candidate_key_dims",
    "chunk_choices",
    "does_not_fit",
    "largest_knob",
]

MIN_K_RATIO = 0.25
"""Smallest ``k_ratio`` considered: below a quarter of the channels the prototype's perplexity exploded."""
CHUNK_CHOICES = (256, 512, 1024, 2048, 4096, 8192)
"""Prefill chunks the planner searches when none is given (and one forward for prompts up to the largest)."""


@dataclass(frozen=True)
class Limits:
    """What a plan point must fit: a KV budget, the device memory or both, and a host budget (``None``: unchecked).

    All in bytes. For a run split over several GPUs (``Breakdown.devices``) the KV budget and the
    device memory bound every GPU (:attr:`~kvpress_aqua.planner.breakdown.Breakdown.device_cache_peak`,
    :attr:`~kvpress_aqua.planner.breakdown.Breakdown.device_total`); the host budget bounds the one host.

    Attributes
    ----------
    kv : int or None
        Bound on :attr:`~kvpress_aqua.planner.breakdown.Breakdown.cache_peak` (keys, values, slot
        metadata and AQUA projections at the most the cache holds on the device).
    device : int or None
        Bound on :attr:`~kvpress_aqua.planner.breakdown.Breakdown.total` (weights + cache + working set
        + overhead).
    host : int or None
        Bound on :attr:`~kvpress_aqua.planner.breakdown.Breakdown.host_peak` (a retrieval cache's
        offloaded tier at its most).

    """

    kv: int | None
    device: int | None = None
    host: int | None = None

    def __post_init__(self) -> None:
        if self.kv is None and self.device is None:
            raise ValueError("give a KV-cache budget (--budget 8GB) or the device memory (--device-memory h100), "
                             "or both")

    def exceeded(self, m: Breakdown) -> tuple[str, ...]:
        """The limits ``m`` exceeds: ``"KV budget"``, ``"device memory"``, ``"host budget"`` (empty when it fits)."""
        over = []
        if self.kv is not None and m.device_cache_peak > self.kv:
            over.append("KV budget")
        if self.device is not None and m.device_total > self.device:
            over.append("device memory")
        if self.host is not None and m.host_peak > self.host:
            over.append("host budget")
        return tuple(over)

    def fits(self, m: Breakdown) -> bool:
        """Whether ``m`` fits every limit given."""
        return not self.exceeded(m)

    def excess(self, m: Breakdown) -> float:
        """``need / have`` of the tightest limit (at most 1 when ``m`` fits): ranks points that do not fit."""
        ratios = [m.device_cache_peak / self.kv] if self.kv is not None else []
        if self.device is not None:
            ratios.append(m.device_total / self.device)
        if self.host is not None:
            ratios.append(m.host_peak / self.host)
        return max(ratios)


def candidate_key_dims(head_dim: int) -> list[int]:
    """Stored key widths considered, widest first.

    Multiples of 8 (16 for ``head_dim >= 128``) from ``MIN_K_RATIO * head_dim`` up to ``head_dim``:
    ``64 -> 64, 56, ..., 16`` (k_ratio 1 to 0.25), ``128 -> 128, 112, ..., 32``.
    """
    step = 16 if head_dim >= 128 else 8
    low = math.ceil(head_dim * MIN_K_RATIO)
    dims = {c for c in range(step, head_dim + 1, step) if c >= low} | {head_dim}
    return sorted(dims, reverse=True)


def chunk_choices(context: int, given: int | None) -> tuple[int | None, ...]:
    """Prefill chunks to search: ``(given,)`` when given, else :data:`CHUNK_CHOICES` below ``context``.

    One forward for the whole prompt (``None``) is added only for prompts no longer than the largest
    choice: a longer prompt in one forward holds every token in the cache before it evicts.
    """
    if given is not None:
        return (given,)
    chunks: tuple[int | None, ...] = tuple(c for c in CHUNK_CHOICES if c < context)
    return chunks + (None,) if context <= CHUNK_CHOICES[-1] else chunks


def largest_knob(mm: MemoryModel, key_dim: int, limits: Limits, lowest: int) -> tuple[bool, int | None]:
    """``(fits, knob)``: every token (``None``) if that fits, else the knob keeping the most tokens that fits.

    The knobs are :meth:`MemoryModel.knobs` (token budgets ``lowest ... seen - 2``, or a block
    summary's halvings), cheapest first; memory grows along them, so the last that fits is found by
    bisection. When nothing fits, the knob returned is the cheaper of every token and the cheapest knob.
    """
    keep_all = mm.evaluate(key_dim, None)
    if limits.fits(keep_all):
        return True, None
    knobs = mm.knobs(lowest)
    if not knobs:
        return False, None
    smallest = mm.evaluate(key_dim, knobs[0])
    if not limits.fits(smallest):
        return False, knobs[0] if limits.excess(smallest) < limits.excess(keep_all) else None
    lo, hi = 0, len(knobs) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if limits.fits(mm.evaluate(key_dim, knobs[mid])):
            lo = mid
        else:
            hi = mid - 1
    return True, knobs[lo]


def best_chunk(mm: MemoryModel, key_dim: int, limits: Limits, lowest: int, chunks: Sequence[int | None],
               score: Callable[[int | None], float]) -> tuple[bool, int | None, int | None]:
    """``(fits, knob, chunk)``: the prefill chunk whose largest knob (:func:`largest_knob`) scores best.

    ``score(knob)`` is the estimated quality of a knob (a token budget, or a block summary's halvings).
    Among chunks whose quality equals the best to the three printed decimals, the largest chunk wins
    (fewer forwards). When no chunk fits, the
    point closest to fitting (:meth:`Limits.excess`) is returned.
    """
    results = []
    for chunk in chunks:
        fits, knob = largest_knob(replace(mm, prefill_chunk=chunk), key_dim, limits, lowest)
        results.append((fits, knob, chunk))
    fitting = [r for r in results if r[0]]
    if not fitting:
        return min(results, key=lambda r: limits.excess(replace(mm, prefill_chunk=r[2]).evaluate(key_dim, r[1])))
    top = max(round(score(r[1]), 3) for r in fitting)
    return max((r for r in fitting if round(score(r[1]), 3) == top), key=lambda r: r[2] or mm.context)


def _cheapest(mm: MemoryModel, min_tokens: int, limits: Limits,
              chunks: Sequence[int | None]) -> tuple[int, int | None, int | None, Breakdown]:
    """The point closest to fitting: any key width and chunk, keeping every token or the cheapest knob considered.

    Keeping every token can be the cheaper of the two: a plain ``DynamicCache`` has no slot metadata
    and the model's fused attention materializes no score matrix.
    """
    knobs = mm.knobs(min_tokens)
    points = [(k, b, c, replace(mm, prefill_chunk=c).evaluate(k, b))
              for k in candidate_key_dims(mm.shape.info.head_dim) for b in {None, *knobs[:1]} for c in chunks]
    return min(points, key=lambda p: limits.excess(p[3]))


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


def does_not_fit(mm: MemoryModel, limits: Limits, min_tokens: int, given_chunk: int | None) -> str:
    """Why nothing fits ``limits``, and what would: the largest context and batch.

    The point closest to fitting (any key width and searched chunk, every token or the cheapest
    knob: ``min_tokens``, a block summary's most halvings, retrieval's fewest ``top_k`` with its
    smallest proxy) is set against the limit it exceeds; when the weights and overhead alone exceed
    the device memory, the message says so instead. A block summary's memory has a floor (its
    sinks, recent and pending tokens, and a rate of the middle), so its message also says whether a
    token budget (H2O) would fit. A retrieval tier that exceeds the host budget at every key width
    gets its own message (:func:`_host_does_not_fit`).
    """
    chunks = chunk_choices(mm.context, given_chunk)
    if mm.retrieves:
        mm = replace(mm, rank=min(proxy_ranks(mm.shape.info.head_dim)))
        host = _host_does_not_fit(mm, limits, min_tokens, chunks)
        if host:
            return host
    key_dim, knob, chunk, need = _cheapest(mm, min_tokens, limits, chunks)
    k_ratio = key_dim / mm.shape.info.head_dim
    at = (f"k_ratio {k_ratio:g} keeping {mm.knob_text(knob)}, "
          + (f"prefill chunk {chunk:,}" if chunk else "prefill in one forward"))
    over = limits.exceeded(need)
    if "device memory" in over:
        what, have, needed = "of device memory", limits.device, need.device_total
    else:
        what, have, needed = "of KV cache", limits.kv, need.device_cache_peak
    gpu = " on its most loaded GPU" if need.devices else ""
    head = (f"does not fit: needs {format_bytes(needed)} ({needed:,} B) {what}{gpu} even at {at}; you have "
            f"{format_bytes(have)} ({have:,} B){' per GPU' if gpu else ''}")
    busiest = need.busiest
    fixed = busiest.weights + busiest.overhead
    if limits.device is not None and fixed >= limits.device:
        return (f"{head}; the weights alone need {format_bytes(busiest.weights)}{gpu} plus "
                f"{format_bytes(busiest.overhead)} overhead, so no context or batch fits: use a smaller dtype "
                "(--dtype fp8), a smaller model, more GPUs or more memory")

    def fits_with(**changes: Any) -> bool:
        changed = replace(mm, **changes)
        return limits.fits(_cheapest(changed, min_tokens, limits, chunk_choices(changed.context, given_chunk))[3])

    context = _largest(lambda c: fits_with(context=c), mm.context - 1)
    parts = [f"the largest context that fits at batch {mm.batch} is {context:,} tokens" if context
             else f"no context fits at batch {mm.batch}"]
    if mm.batch > 1:
        batch = _largest(lambda b: fits_with(batch=b), mm.batch - 1)
        parts.append(f"the largest batch that fits at {mm.context:,} tokens is {batch}" if batch
                     else f"not even batch 1 fits at {mm.context:,} tokens")
    if mm.keeps_rate and limits.fits(_cheapest(replace(mm, token_policy="h2o"), min_tokens, limits, chunks)[3]):
        parts.append(f"a token budget goes lower than {mm.token_policy}'s rate: --token-policy h2o fits (at least "
                     f"--min-tokens {min_tokens} tokens)")
    return f"{head}; " + "; ".join(parts)


def _host_need(mm: MemoryModel, min_tokens: int, chunks: Sequence[int | None]) -> tuple[int, int, int | None]:
    """``(host peak, key width, chunk)`` of the retrieval point that needs the least host memory (0: no knob)."""
    knobs = mm.knobs(min_tokens)
    if not knobs:
        return 0, mm.shape.info.head_dim, None
    return min(((replace(mm, prefill_chunk=c).evaluate(k, knobs[0]).host_peak, k, c)
                for k in candidate_key_dims(mm.shape.info.head_dim) for c in chunks), key=lambda p: p[0])


def _host_does_not_fit(mm: MemoryModel, limits: Limits, min_tokens: int, chunks: Sequence[int | None]) -> str:
    """The one-line message when a retrieval tier exceeds the host budget at every key width and chunk, else ``""``."""
    need, key_dim, chunk = _host_need(mm, min_tokens, chunks)
    if limits.host is None or need <= limits.host:
        return ""

    def fits(context: int) -> bool:
        changed = replace(mm, context=context)
        return _host_need(changed, min_tokens, chunk_choices(context, chunk if len(chunks) == 1 else None))[0] \
            <= limits.host

    context = _largest(fits, mm.context - 1)
    shorter = (f"the largest context whose tier fits at batch {mm.batch} is {context:,} tokens" if context
               else f"no context fits at batch {mm.batch}")
    at = f"k_ratio {key_dim / mm.shape.info.head_dim:g} ({key_dim} key channels), " + (
        f"prefill chunk {chunk:,}" if chunk else "prefill in one forward")
    return (f"does not fit: the retrieval tier needs {format_bytes(need)} ({need:,} B) of host memory even at {at}; "
            f"you have {format_bytes(limits.host)} ({limits.host:,} B) of --host-budget: raise --host-budget to at "
            f"least {format_bytes(need)}, keep the tier on the device with --offload none, or plan a shorter "
            f"context ({shorter})")


def binding(mm: MemoryModel, limits: Limits, best: Candidate) -> tuple[str, str]:
    """What stops the recommendation from keeping more, and the tier it is on: ``(text, tier)``.

    ``tier`` is ``"device"`` (the KV budget or the device memory stop a larger knob), ``"host"``
    (a retrieval cache's host budget stops a wider key width: the tier's rows grow with it, not
    with ``top_k``), ``"device and host"``, or ``"none"``.
    """
    if best.knob is None:
        return "nothing binds: every token is kept", "none"
    run = run_of(mm, best)
    over = tuple(o for o in limits.exceeded(run.evaluate(best.key_dim, run.dearer(best.knob))) if o != "host budget")
    m, knob = best.memory.busiest, " top_k" if mm.retrieves else ""
    gpu = f" on GPU {best.memory.devices.index(m)}, the most loaded" if best.memory.devices else ""
    parts = []
    if over == ("device memory",):
        parts.append(f"the device memory binds{knob} ({format_bytes(m.total)} of {format_bytes(limits.device)}{gpu}: "
                     f"weights {format_bytes(m.weights)}, cache {format_bytes(m.cache_peak)}, working set "
                     f"{format_bytes(m.working_set)}, overhead {format_bytes(m.overhead)})")
    elif over or not mm.retrieves:
        peak = best.memory.device_cache_peak
        parts.append(f"the {' and '.join(over)} bind{'s' if len(over) == 1 else ''}{knob} "
                     f"({format_bytes(peak)} of KV cache{' on the most loaded GPU' if gpu else ''})")
    wider = [k for k in candidate_key_dims(mm.shape.info.head_dim) if k > best.key_dim]
    host = run.evaluate(min(wider), best.knob).host_peak if mm.retrieves and wider and limits.host else 0
    if limits.host is not None and host > limits.host:
        parts.append(f"the host budget binds the key width (k_ratio {min(wider) / mm.shape.info.head_dim:g}'s tier "
                     f"needs {format_bytes(host)} of host memory, more than {format_bytes(limits.host)})")
    if not parts:
        parts.append("no limit binds top_k or the key width")
    tiers = [t for t, hit in (("device", bool(over)), ("host", limits.host is not None and host > limits.host)) if hit]
    return "; ".join(parts), " and ".join(tiers) or "none"

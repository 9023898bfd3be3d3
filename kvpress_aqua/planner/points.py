"""Plan points: a key width, a prefill chunk and a token knob with their bytes and estimated quality.

:class:`Candidate` is one point; :func:`point` builds one from a
:class:`~kvpress_aqua.planner.memory.MemoryModel` and a
:class:`~kvpress_aqua.planner.quality.QualityModel`, with its policy stack (the token policy: a
budget split by the registry, :func:`~kvpress_aqua.policies.registry.token_entry`, a block
summary's halvings, :func:`~kvpress_aqua.planner.summaries.summary_entry`, or retrieval's ``top_k``
and rank, :func:`~kvpress_aqua.planner.retrieval.retrieval_entry`; and AQUA); :func:`frontier` is
the memory-quality Pareto set of the fitting points. :mod:`kvpress_aqua.planner.search` uses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..policies.registry import DEFAULT_SINKS, policy_type, token_entry
from .breakdown import Breakdown
from .memory import MemoryModel
from .quality import QualityModel
from .retrieval import retrieval_entry
from .summaries import halvings_text, summary_entry

__all__ = ["Candidate", "budget_grid", "frontier", "knob_grid", "point", "run_of", "score"]


@dataclass(frozen=True)
class Candidate:
    """One plan point: a key width and prefill chunk with the largest token budget that fits (or the smallest).

    Attributes
    ----------
    k_ratio : float
        ``key_dim / head_dim``; 1 means no AQUA.
    key_dim : int
        Stored key channels.
    token_budget : int or None
        Tokens kept per layer, KV head and sequence; ``None`` keeps every token, or the token policy
        is a block summary (:attr:`halvings`) or retrieval (:attr:`top_k`).
    prefill_chunk : int or None
        Tokens per prefill forward the point is planned with (``None``: the whole prompt at once).
    retained : float
        Fraction of the tokens seen that the budget keeps.
    memory : Breakdown
        Predicted bytes.
    quality : float
        Estimated quality (see :class:`QualityModel`).
    fits : bool
        Whether ``memory.total`` fits the budget.
    verdict : str
        ``recommended``, ``fits`` or ``does not fit`` (``frontier`` for :attr:`Plan.frontier` points).
    entries : tuple of dict
        The policy stack as :class:`~kvpress_aqua.presets.spec.PolicySpec` entries.
    halvings : int or None
        A block summary's (BalanceKV, uniform) halvings: it keeps ``1 / 2**halvings`` of the middle;
        ``None`` for a budget, or when every token is kept.
    held : int or None
        With :attr:`halvings`: the tokens held per layer, KV head and sequence at the end.
    top_k, rank : int or None
        Retrieval: the rows each decode step retrieves per layer, KV head and sequence, and the
        proxy's channels; ``None`` otherwise, or when every token is kept.

    """

    k_ratio: float
    key_dim: int
    token_budget: int | None
    prefill_chunk: int | None
    retained: float
    memory: Breakdown
    quality: float
    fits: bool
    verdict: str
    entries: tuple[dict[str, Any], ...]
    halvings: int | None = None
    held: int | None = None
    top_k: int | None = None
    rank: int | None = None

    @property
    def knob(self) -> int | None:
        """The token policy's knob: :attr:`halvings`, :attr:`top_k` (retrieval), else :attr:`token_budget`."""
        if self.top_k is not None:
            return self.top_k
        return self.token_budget if self.halvings is None else self.halvings

    def label(self, seen: int) -> str:
        """Short human label: ``"k_ratio 0.5 (32 key channels), 1,024 tokens"`` (or the halvings, or top_k and rank)."""
        if self.halvings is not None:
            tokens = halvings_text(self.halvings, self.held, seen)
        elif self.top_k is not None:
            proxy = f"rank-{self.rank}" + (" int8" if self.entries[0]["proxy_dtype"] == "int8" else "")
            tokens = f"top_k {self.top_k:,} with a {proxy} proxy (every {seen:,} tokens kept in the tier)"
        else:
            tokens = f"all {seen:,} tokens" if self.token_budget is None else f"{self.token_budget:,} tokens"
        return f"k_ratio {self.k_ratio:g} ({self.key_dim} key channels), {tokens}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        m = self.memory
        return {
            "k_ratio": self.k_ratio, "key_dim": self.key_dim, "token_budget": self.token_budget,
            "halvings": self.halvings, "tokens_held": self.held, "top_k": self.top_k, "rank": self.rank,
            "prefill_chunk": self.prefill_chunk,
            "retained": self.retained, "quality": self.quality,
            "fits": self.fits, "verdict": self.verdict, "cache_bytes": m.cache_bytes,
            "cache_peak_bytes": m.cache_peak, "kv_bytes": m.kv, "projection_bytes": m.projections,
            "weights_bytes": m.weights, "peak_kv_bytes": m.peak_kv, "attention_bytes": m.attention,
            "activation_bytes": m.activations, "copy_bytes": m.copy, "overhead_bytes": m.overhead,
            "peak_phase": m.peak_phase, "total_bytes": m.total, "host_bytes": m.host, "host_peak_bytes": m.host_peak,
            "policies": [dict(e) for e in self.entries],
            "devices": [{"device": i, "weights_bytes": d.weights, "kv_bytes": d.kv, "cache_peak_bytes": d.cache_peak,
                         "working_set_bytes": d.working_set, "overhead_bytes": d.overhead, "total_bytes": d.total,
                         "peak_phase": d.peak_phase} for i, d in enumerate(m.devices)],
        }


def budget_grid(low: int, high: int, points: int) -> list[int]:
    """About ``points`` budgets spaced geometrically from ``low`` to ``high`` (both included)."""
    if high < low:
        return []
    ratio = (high / low) ** (1 / max(points - 1, 1))
    return sorted({min(high, round(low * ratio**i)) for i in range(points)} | {high})


def knob_grid(mm: MemoryModel, min_tokens: int, top: int | None, points: int) -> list[int]:
    """Knobs from the cheapest up to ``top`` (``None``: the dearest), cheapest first, for curves and the frontier.

    About ``points`` token budgets (or retrieval's ``top_k``) spaced geometrically from the cheapest,
    or every halvings of a block summary (at most :data:`~kvpress_aqua.planner.summaries.MAX_HALVINGS`).
    """
    knobs = mm.knobs(min_tokens)
    if mm.keeps_rate:
        knobs = list(knobs)
        return knobs if top is None else knobs[:knobs.index(top) + 1]
    if not knobs:
        return []
    return budget_grid(knobs[0], knobs[-1] if top is None else top, points)


def run_of(mm: MemoryModel, c: Candidate) -> MemoryModel:
    """The run of a plan point: ``mm`` with the point's prefill chunk and (retrieval) proxy rank."""
    return replace(mm, prefill_chunk=c.prefill_chunk, rank=mm.rank if c.rank is None else c.rank)


def score(mm: MemoryModel, quality: QualityModel, key_dim: int, knob: int | None) -> float:
    """Estimated quality of keeping ``key_dim`` key channels and the tokens ``knob`` holds (``None``: all).

    A retrieval point attends its held slots and ``top_k`` retrieved tokens per decode step; the
    retrieved ones count at the key energy ``E(rank / head_dim)`` its proxy keeps (the quality
    model's energy curve): a proxy that misses part of the keys picks part of the tokens wrongly.
    """
    d = mm.shape.info.head_dim
    attended = mm.held(knob)
    if mm.retrieves and knob is not None:
        attended = min(mm.held_slots, mm.seen) + (attended - min(mm.held_slots, mm.seen)) * \
            quality.channel_energy(mm.rank / d)
    return quality(key_dim / d, attended / mm.seen, mm.token_policy)


def point(mm: MemoryModel, quality: QualityModel, key_dim: int, knob: int | None, chunk: int | None, fits: bool,
          verdict: str) -> Candidate:
    """The plan point of ``key_dim`` channels, the token ``knob`` and prefill ``chunk``: bytes, quality, stack."""
    summary = mm.keeps_rate and knob is not None
    retrieval = mm.retrieves and knob is not None
    return Candidate(
        k_ratio=key_dim / mm.shape.info.head_dim, key_dim=key_dim,
        token_budget=None if mm.keeps_rate or mm.retrieves else knob,
        prefill_chunk=chunk, retained=mm.held(knob) / mm.seen,
        memory=replace(mm, prefill_chunk=chunk).evaluate(key_dim, knob),
        quality=score(mm, quality, key_dim, knob), fits=fits, verdict=verdict, entries=_entries(mm, key_dim, knob),
        halvings=knob if summary else None, held=mm.held(knob) if summary else None,
        top_k=knob if retrieval else None, rank=mm.rank if retrieval else None,
    )


def frontier(mm: MemoryModel, quality: QualityModel, fitting: Sequence[Candidate], min_tokens: int,
             points: int = 16) -> list[Candidate]:
    """Pareto frontier (KV cache bytes, per GPU when split, vs quality) of every fitting key width over knobs.

    Each width keeps its chunk; cheapest first.
    """
    pool = []
    for c in fitting:
        run = run_of(mm, c)
        knobs = [k for k in knob_grid(run, min_tokens, c.knob, points) if k != c.knob]
        pool += [point(run, quality, c.key_dim, k, c.prefill_chunk, fits=True, verdict="frontier") for k in knobs]
        pool.append(replace(c, verdict="frontier"))
    best = [c for c in pool if not any(_dominates(o, c) for o in pool)]
    unique = {(c.key_dim, c.knob): c for c in best}
    return sorted(unique.values(), key=lambda c: (c.memory.device_cache_peak, -c.quality))


def _entries(mm: MemoryModel, key_dim: int, knob: int | None) -> tuple[dict[str, Any], ...]:
    info = mm.shape.info
    entries = []
    if knob is not None and mm.keeps_rate:
        entries.append(summary_entry(policy_type(mm.token_policy).name, knob))
    elif knob is not None and mm.retrieves:
        entries.append(retrieval_entry(knob, mm.rank, mm.offload, mm.max_sinks, mm.proxy_dtype))
    elif knob is not None:
        entries.append(token_entry(mm.token_policy, knob, DEFAULT_SINKS if mm.max_sinks is None else mm.max_sinks))
    if key_dim < info.head_dim:
        entries.append({"type": "aqua", "k_ratio": key_dim / info.head_dim})
    return tuple(entries)


def _dominates(a: Candidate, b: Candidate) -> bool:
    """``a`` is no worse than ``b`` on KV cache bytes (the most loaded GPU's) and quality, and better on one."""
    x, y = a.memory.device_cache_peak, b.memory.device_cache_peak
    return x <= y and a.quality >= b.quality and (x < y or a.quality > b.quality)


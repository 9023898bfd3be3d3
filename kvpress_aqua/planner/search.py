"""Memory-budget planner: pick the key-channel ratio and the token budget together.

:func:`plan` answers "with this model, this context and this batch, what fits in my memory, and what
do I give up?". For every candidate AQUA ``k_ratio`` it finds the largest token budget that fits,
scores each point with a quality model, and returns the Pareto frontier and a recommendation.
It reads the model's config only, never its weights, and imports neither torch nor transformers.

The parts, each re-exported here:

- :mod:`kvpress_aqua.planner.model_shape`: the model's shapes and parameter count from its config
  (:func:`resolve_model`, :class:`ModelShape`, :func:`count_parameters`), the config read as JSON
  by :mod:`kvpress_aqua.planner.config`;
- :mod:`kvpress_aqua.planner.memory`: the bytes of a run for any key width and token budget
  (:class:`MemoryModel`, :class:`Breakdown`; the formula is in its docstring);
- :mod:`kvpress_aqua.planner.quality`: the estimated quality of a point, from a calibration sweep,
  an artifact's spectrum or the default curve (:class:`QualityModel`);
- :mod:`kvpress_aqua.planner.fit`: the key widths considered, the largest budget that fits, and what
  would fit when nothing does (:func:`candidate_key_dims`);
- this module: the search over key widths and budgets, the frontier and the answer (:class:`Plan`).

Any token policy of :mod:`kvpress_aqua.policies.registry` can be planned (``token_policy=``): the
registry says whether it keeps scores (charged per slot) and how a budget splits into its knobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..policies.registry import DEFAULT_SINKS, policy_type, token_entry
from ..presets.spec import PolicySpec
from ..util.dtypes import short_name
from ..util.sizes import format_bytes, parse_size, parse_tokens
from .fit import MIN_K_RATIO, candidate_key_dims, does_not_fit, largest_budget
from .memory import ATTENTION_COPIES, DEFAULT_OVERHEAD, HIDDEN_COPIES, MLP_COPIES, Breakdown, MemoryModel, Term
from .model_shape import ModelShape, count_parameters, offline_models, resolve_model
from .quality import DEFAULT_ENERGY, ENERGY_BETA, ENERGY_GAMMA, RETENTION_EXPONENT, QualityModel, find_quality

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "ATTENTION_COPIES",
    "DEFAULT_ENERGY",
    "DEFAULT_MIN_TOKENS",
    "DEFAULT_OVERHEAD",
    "ENERGY_BETA",
    "ENERGY_GAMMA",
    "HIDDEN_COPIES",
    "MIN_K_RATIO",
    "MLP_COPIES",
    "RETENTION_EXPONENT",
    "Breakdown",
    "Candidate",
    "MemoryModel",
    "ModelShape",
    "Plan",
    "QualityModel",
    "Term",
    "candidate_key_dims",
    "count_parameters",
    "offline_models",
    "plan",
    "resolve_model",
]

DEFAULT_MIN_TOKENS = 64
"""A plan keeping fewer tokens per sequence than this is treated as not fitting."""


@dataclass(frozen=True)
class Candidate:
    """One plan point: a key width with the largest token budget that fits (or the smallest considered).

    Attributes
    ----------
    k_ratio : float
        ``key_dim / head_dim``; 1 means no AQUA.
    key_dim : int
        Stored key channels.
    token_budget : int or None
        Tokens kept per layer, KV head and sequence; ``None`` keeps every token.
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

    """

    k_ratio: float
    key_dim: int
    token_budget: int | None
    retained: float
    memory: Breakdown
    quality: float
    fits: bool
    verdict: str
    entries: tuple[dict[str, Any], ...]

    def label(self, seen: int) -> str:
        """Short human label: ``"k 0.5, 1,024 tokens"``."""
        tokens = f"all {seen:,} tokens" if self.token_budget is None else f"{self.token_budget:,} tokens"
        return f"k_ratio {self.k_ratio:g} ({self.key_dim} key channels), {tokens}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        m = self.memory
        return {
            "k_ratio": self.k_ratio, "key_dim": self.key_dim, "token_budget": self.token_budget,
            "retained": self.retained, "quality": self.quality, "fits": self.fits, "verdict": self.verdict,
            "cache_bytes": m.cache_bytes, "kv_bytes": m.kv, "projection_bytes": m.projections,
            "weights_bytes": m.weights, "peak_kv_bytes": m.peak_kv, "attention_bytes": m.attention,
            "activation_bytes": m.activations, "copy_bytes": m.copy, "overhead_bytes": m.overhead,
            "peak_phase": m.peak_phase, "total_bytes": m.total, "policies": [dict(e) for e in self.entries],
        }


@dataclass(frozen=True)
class Plan:
    """The planner's answer; rich-friendly fields, :meth:`to_dict`, :meth:`to_toml`, :meth:`explain`.

    Attributes
    ----------
    budget : int
        Memory budget in bytes.
    model : ModelShape
        The model planned for.
    memory_model : MemoryModel
        The run (batch, context, dtype...) and its byte formulas.
    quality_source : str
        Where the quality estimates come from.
    candidates : tuple of Candidate
        One per key width, widest first.
    frontier : tuple of Candidate
        The memory-quality Pareto frontier, cheapest first: fitting points (any key width, token
        budgets from ``min_tokens`` up to each width's largest) that no other point beats on both
        total bytes and quality.
    recommendation : Candidate or None
        The best estimated quality that fits (ties: fewer bytes); ``None`` when nothing fits.
    message : str
        One-paragraph verdict, with the "does not fit: needs X, you have Y" analysis when nothing fits.
    notes : tuple of str
        Caveats (context beyond the model's limit, approximate parameter count...).

    """

    budget: int
    model: ModelShape
    memory_model: MemoryModel
    quality_model: QualityModel = field(repr=False)
    min_tokens: int
    candidates: tuple[Candidate, ...]
    frontier: tuple[Candidate, ...]
    recommendation: Candidate | None
    message: str
    notes: tuple[str, ...] = ()

    @property
    def quality_source(self) -> str:
        """Where the quality estimates come from."""
        return self.quality_model.source

    @property
    def fits(self) -> bool:
        """Whether any candidate fits."""
        return self.recommendation is not None

    def policy_spec(self) -> PolicySpec:
        """The recommendation as a :class:`~kvpress_aqua.presets.spec.PolicySpec` (``spec.build()`` gives the policies).

        Building it loads no policy class (no torch); ``spec.build()`` does.
        """
        if self.recommendation is None:
            raise ValueError(f"nothing fits, so there is no preset to emit: {self.message}")
        r, mm = self.recommendation, self.memory_model
        description = (
            f"kvtool plan for {self.model.info.name}: {mm.context:,} context, batch {mm.batch}, "
            f"{mm.new_tokens} new tokens, {mm.dtype}, budget {format_bytes(self.budget)}: {r.label(mm.seen)}, "
            f"estimated quality {r.quality:.3f} ({self.quality_source})"
        )
        return PolicySpec(name="plan", entries=r.entries, description=description)

    def to_toml(self) -> str:
        """The recommendation as a preset TOML document (loadable by ``parse_policy`` / ``CompressedCache``)."""
        return self.policy_spec().to_toml()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plan: inputs, model, candidates, frontier, recommendation, message."""
        mm, info = self.memory_model, self.model.info
        return {
            "budget_bytes": self.budget,
            "model": {
                "name": info.name, "source": self.model.source, "model_type": info.model_type,
                "layers": info.num_layers, "heads": info.num_heads, "kv_heads": info.num_kv_heads,
                "head_dim": info.head_dim, "sliding_window": info.sliding_window,
                "sliding_layers": sum(w is not None for w in mm.windows), "parameters": self.model.parameters,
            },
            "dtype": mm.dtype, "context": mm.context, "batch": mm.batch, "new_tokens": mm.new_tokens,
            "prefill_chunk": mm.prefill_chunk, "overhead_bytes": mm.overhead, "token_policy": mm.token_policy,
            "min_tokens": self.min_tokens, "quality_source": self.quality_source,
            "quality_kind": self.quality_model.kind,
            "candidates": [c.to_dict() for c in self.candidates],
            "frontier": [c.to_dict() for c in self.frontier],
            "recommendation": self.recommendation.to_dict() if self.recommendation else None,
            "fits": self.fits, "message": self.message, "notes": list(self.notes),
        }

    def explain(self) -> str:
        """The memory formula with this plan's numbers substituted (recommendation, else the cheapest point)."""
        point = self.recommendation or min(self.candidates, key=lambda c: c.memory.total)
        m, mm = point.memory, self.memory_model
        lines = [
            f"Memory formula for {point.label(mm.seen)} ({mm.batch} × {mm.context:,}-token prompts, "
            f"{mm.new_tokens} new tokens, {mm.dtype}: e = {mm.elem} B, B = {mm.batch}):",
            "  total = weights + AQUA projections + overhead + max over phases (KV held + attention + activations "
            "+ layer copy)",
        ]
        for t in m.terms:
            lines += [f"  {t.name}", f"    = {t.formula}", f"    = {t.numbers}",
                      f"    = {t.nbytes:,} B ({format_bytes(t.nbytes)})"]
        lines.append(
            f"  total = {m.weights:,} + {m.projections:,} + {m.overhead:,} + ({m.peak_kv:,} + {m.attention:,} + "
            f"{m.activations:,} + {m.copy:,}) = {m.total:,} B ({format_bytes(m.total)}) at the {m.peak_phase} peak"
        )
        lines.append(
            f"  constants: ATTENTION_COPIES={ATTENTION_COPIES}, HIDDEN_COPIES={HIDDEN_COPIES}, "
            f"MLP_COPIES={MLP_COPIES}, overhead={format_bytes(mm.overhead)}; the KV terms are exact "
            "(kvpress_aqua.core.accounting), the rest are estimates"
        )
        return "\n".join(lines)

    def curves(self, points: int = 24) -> dict[float, list[tuple[int, float]]]:
        """``k_ratio -> [(total bytes, quality)]`` for budgets from ``min_tokens`` to every token, by bytes (plots)."""
        mm = self.memory_model
        out = {}
        for c in self.candidates:
            row = []
            for b in _budget_grid(self.min_tokens, mm.seen - 2, points) + [None]:
                point = _point(mm, self.quality_model, c.key_dim, b, fits=True, verdict="")
                row.append((point.memory.total, point.quality))
            out[c.k_ratio] = sorted(row)
        return out


def _budget_grid(low: int, high: int, points: int) -> list[int]:
    """About ``points`` budgets spaced geometrically from ``low`` to ``high`` (both included)."""
    if high < low:
        return []
    ratio = (high / low) ** (1 / max(points - 1, 1))
    return sorted({min(high, round(low * ratio**i)) for i in range(points)} | {high})


def _point(mm: MemoryModel, quality: QualityModel, key_dim: int, budget: int | None, fits: bool,
           verdict: str) -> Candidate:
    k_ratio = key_dim / mm.shape.info.head_dim
    retained = 1.0 if budget is None else budget / mm.seen
    return Candidate(
        k_ratio=k_ratio, key_dim=key_dim, token_budget=budget, retained=retained,
        memory=mm.evaluate(key_dim, budget), quality=quality(k_ratio, retained, mm.token_policy), fits=fits,
        verdict=verdict, entries=_entries(mm, key_dim, budget),
    )


def _frontier(mm: MemoryModel, quality: QualityModel, fitting: Sequence[Candidate], min_tokens: int,
              points: int = 16) -> list[Candidate]:
    """Pareto frontier of every fitting key width over budgets up to its largest, cheapest first."""
    pool = []
    for c in fitting:
        top = mm.seen - 2 if c.token_budget is None else c.token_budget
        budgets = [b for b in _budget_grid(min_tokens, top, points) if b != c.token_budget]
        pool += [_point(mm, quality, c.key_dim, b, fits=True, verdict="frontier") for b in budgets]
        pool.append(replace(c, verdict="frontier"))
    best = [c for c in pool if not any(_dominates(o, c) for o in pool)]
    unique = {(c.key_dim, c.token_budget): c for c in best}
    return sorted(unique.values(), key=lambda c: (c.memory.total, -c.quality))


def _entries(mm: MemoryModel, key_dim: int, budget: int | None) -> tuple[dict[str, Any], ...]:
    info = mm.shape.info
    entries = []
    if budget is not None:
        windows = [w for w in mm.windows if w is not None]
        max_sinks = min(windows) - 1 if windows else DEFAULT_SINKS
        entries.append(token_entry(mm.token_policy, budget, max_sinks))
    if key_dim < info.head_dim:
        entries.append({"type": "aqua", "k_ratio": key_dim / info.head_dim})
    return tuple(entries)


def _check_int(name: str, value: Any, minimum: int, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value).strip())
        except ValueError:
            raise ValueError(f"{name} {value!r} is not a whole number; e.g. {example}") from None
    if value < minimum:
        raise ValueError(f"{name} {value} must be at least {minimum}; e.g. {example}")
    return value


def plan(
    budget: int | str,
    model: str | Path | PretrainedConfig,
    context: int | str | None = None,
    batch: int = 1,
    new_tokens: int = 0,
    dtype: str | None = None,
    prefill_chunk: int | str | None = None,
    overhead: int | str | None = None,
    *,
    token_policy: str = "h2o",
    min_tokens: int = DEFAULT_MIN_TOKENS,
    quality: QualityModel | None = None,
    artifact: str | Path | None = None,
) -> Plan:
    """Pick ``k_ratio`` and the token budget together under a memory budget.

    Parameters
    ----------
    budget : int or str
        Memory budget: bytes, or a size string (``"8GB"`` = 8*10^9, ``"24GiB"`` = 24*2^30).
    model : str, Path or PretrainedConfig
        Hub id, short name (``"smollm2-135m"``), model folder, config.json, or a config object.
    context : int or str, optional
        Prompt tokens (``"128k"`` = 131072); default the model's ``max_position_embeddings``.
    batch : int, default 1
        Sequences decoded together.
    new_tokens : int, default 0
        Tokens generated per sequence.
    dtype : str, optional
        ``fp32``, ``bf16``, ``fp16`` or ``fp8`` for weights and KV; default the config's dtype, else fp32.
    prefill_chunk : int or str, optional
        Prefill chunk size (``CompressedCache(prefill_chunk=...)`` with ``cache.prefill``); default one chunk.
    overhead : int or str, optional
        Runtime overhead (bytes or a size string); default :data:`DEFAULT_OVERHEAD`.
    token_policy : str, default "h2o"
        Eviction policy of the plans: a token policy of :mod:`kvpress_aqua.policies.registry`
        (``h2o``, ``tova``, ``sliding`` or its alias ``streaming``).
    min_tokens : int, default 64
        Plans keeping fewer tokens per sequence count as not fitting.
    quality : QualityModel, optional
        Quality source; default: the sweep stored beside the model's AQUA artifact, else the
        artifact's SVD spectrum, else the default curve (:attr:`Plan.quality_source` says which and why).
    artifact : str or Path, optional
        The AQUA artifact to read the quality model from; default the one ``kvtool calibrate`` wrote.

    Returns
    -------
    Plan

    Raises
    ------
    ValueError
        Bad input, naming the fix: non-positive budget or context, malformed size, unknown dtype, model
        or token policy.

    """
    limit = parse_size(budget, "budget")
    shape = resolve_model(model)
    if context is None:
        if shape.max_position_embeddings is None:
            raise ValueError("the model config has no max_position_embeddings; give the context, e.g. --context 8192")
        context = shape.max_position_embeddings
    tokens = parse_tokens(context, "context")
    batch = _check_int("batch", batch, 1, "--batch 1")
    new_tokens = _check_int("new tokens", new_tokens, 0, "--new-tokens 256")
    chunk = None if prefill_chunk is None else parse_tokens(prefill_chunk, "prefill chunk")
    min_tokens = _check_int("min tokens", min_tokens, 1, "64")
    token_policy = policy_type(token_policy, "token").name
    dtype_name = short_name(dtype or shape.dtype or "float32")
    overhead_bytes = DEFAULT_OVERHEAD if overhead is None else (
        0 if str(overhead).strip() == "0" else parse_size(overhead, "overhead")
    )
    mm = MemoryModel(shape, batch, tokens, new_tokens, dtype_name, chunk, overhead_bytes, token_policy)
    quality_model = quality or find_quality(shape.info, artifact, token_policy)

    points = []
    for key_dim in candidate_key_dims(shape.info.head_dim):
        fits, b = largest_budget(mm, key_dim, limit, min_tokens)
        points.append(_point(mm, quality_model, key_dim, b, fits, "fits" if fits else "does not fit"))
    fitting = [c for c in points if c.fits]
    best = max(fitting, key=lambda c: (round(c.quality, 9), -c.memory.total), default=None)
    points = [replace(c, verdict="recommended") if c is best else c for c in points]
    best = next((c for c in points if c.verdict == "recommended"), None)
    frontier = _frontier(mm, quality_model, fitting, min_tokens)
    if best is not None:
        message = (f"fits: {best.label(mm.seen)}; predicted peak {format_bytes(best.memory.total)} of "
                   f"{format_bytes(limit)}, KV cache {format_bytes(best.memory.cache_bytes)}, estimated quality "
                   f"{best.quality:.3f}")
    else:
        message = does_not_fit(mm, limit, min_tokens)
    notes = list(shape.notes)
    if shape.max_position_embeddings and mm.context + new_tokens > shape.max_position_embeddings:
        notes.append(f"context + new tokens = {mm.context + new_tokens:,} exceeds the model's "
                     f"max_position_embeddings {shape.max_position_embeddings:,}")
    if dtype is None and shape.dtype is None:
        notes.append("the config states no dtype; planned for fp32 (pass --dtype)")
    if best is not None and best.memory.attention > best.memory.peak_kv:
        notes.append(f"prefill attention scores ({format_bytes(best.memory.attention)}) outweigh the KV cache at the "
                     "peak; a smaller --prefill-chunk leaves room for more tokens")
    if any(e["type"] == "aqua" for e in (best.entries if best else ())):
        notes.append("AQUA needs a calibration artifact for this model (kvtool calibrate) before the cache is built")
    return Plan(limit, shape, mm, quality_model, min_tokens, tuple(points), tuple(frontier), best, message,
                tuple(notes))


def _dominates(a: Candidate, b: Candidate) -> bool:
    """``a`` is no worse than ``b`` on total bytes and quality, and better on one."""
    no_worse = a.memory.total <= b.memory.total and a.quality >= b.quality
    return no_worse and (a.memory.total < b.memory.total or a.quality > b.quality)

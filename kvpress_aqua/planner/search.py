"""Memory-budget planner: pick the key-channel ratio and the token budget together.

:func:`plan` answers "with this model, this context and this batch, what fits in my KV-cache budget
(and my device), and what do I give up?". For every candidate AQUA ``k_ratio`` it finds the prefill
chunk and the largest token budget that fit (:class:`~kvpress_aqua.planner.fit.Limits`: the cache
within the budget, and with ``device_memory`` the whole run within the device), scores each point
with a quality model, and returns the Pareto frontier and a recommendation. It reads the model's
config only, never its weights, and imports neither torch nor transformers.

The parts, each re-exported here:

- :mod:`kvpress_aqua.planner.model_shape`: the model's shapes and parameter count from its config
  (:func:`resolve_model`, :class:`ModelShape`, :func:`count_parameters`), the config read as JSON
  by :mod:`kvpress_aqua.planner.config`;
- :mod:`kvpress_aqua.planner.memory`: the bytes of a run for any key width and token budget
  (:class:`MemoryModel`, :class:`Breakdown`; the formula is in its docstring);
- :mod:`kvpress_aqua.planner.quality`: the estimated quality of a point, from a calibration sweep,
  an artifact's spectrum or the default curve (:class:`QualityModel`);
- :mod:`kvpress_aqua.planner.fit`: the key widths and prefill chunks considered, the largest budget
  that fits, and what would fit when nothing does (:func:`candidate_key_dims`, :class:`Limits`);
- :mod:`kvpress_aqua.planner.devices`: ``device_memory`` as a size or a GPU name;
- :mod:`kvpress_aqua.planner.parallel`: a run split over several GPUs (``gpus``, ``parallel``):
  what each device holds; the limits then bound every GPU;
- this module: the search over key widths and budgets, the frontier and the answer (:class:`Plan`).

Any token policy of :mod:`kvpress_aqua.policies.registry` that splits a budget can be planned
(``token_policy=``): the registry says whether it keeps scores (charged per slot) and how a budget
splits into its knobs. So can the block summaries (BalanceKV, uniform sampling,
:mod:`kvpress_aqua.planner.summaries`), which keep a rate rather than a budget: their knob is
``halvings``, and each slot also holds a float32 log-weight. So can retrieval
(:mod:`kvpress_aqua.planner.retrieval`): every token in a tier (host memory, bounded by
``host_budget``, or the device), its knobs ``top_k`` and the proxy rank, searched together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..policies.registry import POLICY_TYPES, policy_type
from ..presets.spec import PolicySpec
from ..util.dtypes import short_name
from ..util.sizes import format_bytes, parse_size, parse_tokens
from .breakdown import Breakdown, Term
from .devices import GPU_MEMORY_MIB, parse_device_memory
from .fit import (
    CHUNK_CHOICES,
    MIN_K_RATIO,
    Limits,
    best_chunk,
    binding,
    candidate_key_dims,
    chunk_choices,
    does_not_fit,
)
from .memory import ATTENTION_COPIES, DEFAULT_OVERHEAD, HIDDEN_COPIES, MLP_COPIES, MemoryModel
from .model_shape import ModelShape, count_parameters, offline_models, resolve_model
from .notes import plan_notes
from .parallel import PARALLEL_MODES, Parallel
from .points import Candidate, frontier, knob_grid, point, run_of, score
from .quality import DEFAULT_ENERGY, ENERGY_BETA, ENERGY_GAMMA, RETENTION_EXPONENT, QualityModel, find_quality
from .retrieval import RETRIEVAL, proxy_ranks
from .summaries import SUMMARY_POLICIES

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "ATTENTION_COPIES",
    "CHUNK_CHOICES",
    "DEFAULT_ENERGY",
    "DEFAULT_MIN_TOKENS",
    "DEFAULT_OVERHEAD",
    "ENERGY_BETA",
    "ENERGY_GAMMA",
    "GPU_MEMORY_MIB",
    "HIDDEN_COPIES",
    "MIN_K_RATIO",
    "MLP_COPIES",
    "RETENTION_EXPONENT",
    "Breakdown",
    "Candidate",
    "Limits",
    "MemoryModel",
    "ModelShape",
    "Plan",
    "QualityModel",
    "Term",
    "candidate_key_dims",
    "count_parameters",
    "offline_models",
    "plan",
    "plannable_token_policies",
    "resolve_model",
]

DEFAULT_MIN_TOKENS = 64
"""A plan keeping fewer tokens per sequence than this is treated as not fitting."""


@dataclass(frozen=True)
class Plan:
    """The planner's answer; rich-friendly fields, :meth:`to_dict`, :meth:`to_toml`, :meth:`explain`.

    Attributes
    ----------
    limits : Limits
        The KV-cache budget and the device memory (bytes; either may be ``None``: not checked).
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
        KV cache bytes (:attr:`~kvpress_aqua.planner.breakdown.Breakdown.device_cache_peak`) and quality.
    recommendation : Candidate or None
        The best estimated quality that fits (ties: fewer bytes); ``None`` when nothing fits.
    message : str
        One-paragraph verdict, with the "does not fit: needs X, you have Y" analysis when nothing fits.
    notes : tuple of str
        Caveats (context beyond the model's limit, approximate parameter count...).
    device_label : str or None
        The device memory as given (``"h100 (81,559 MiB)"``); ``None`` when not checked.
    binding : str
        What stops the recommendation from keeping more tokens (the KV budget, the device memory;
        for retrieval, what stops ``top_k`` and what stops the key width, the host budget).
    binding_tier : str
        The tier of the limits that bind: ``"device"``, ``"host"``, ``"device and host"`` or ``"none"``.

    """

    limits: Limits
    model: ModelShape
    memory_model: MemoryModel
    quality_model: QualityModel = field(repr=False)
    min_tokens: int
    candidates: tuple[Candidate, ...]
    frontier: tuple[Candidate, ...]
    recommendation: Candidate | None
    message: str
    notes: tuple[str, ...] = ()
    device_label: str | None = None
    binding: str = ""
    binding_tier: str = "none"

    @property
    def budget(self) -> int | None:
        """The KV-cache budget in bytes (``None``: only the device memory is checked)."""
        return self.limits.kv

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
        if any(e["type"] == RETRIEVAL and e["offload"] is None for e in r.entries):
            raise ValueError("a retrieval plan with its tier on the device (--offload none) cannot be written as a "
                             "preset: TOML has no null and Retrieval takes offload 'cpu' or None; build Retrieval("
                             "..., offload=None) in Python from the plan's policies (--json)")
        chunk = f"prefill chunk {r.prefill_chunk:,}" if r.prefill_chunk else "prefill in one forward"
        description = (
            f"kvtool plan for {self.model.info.name}: {mm.context:,} context, batch {mm.batch}, "
            f"{mm.new_tokens} new tokens, {mm.dtype}, {self._limits_text()}: {r.label(mm.seen)}, {chunk}, "
            f"estimated quality {r.quality:.3f} ({self.quality_source})"
        )
        return PolicySpec(name="plan", entries=r.entries, description=description, prefill_chunk=r.prefill_chunk)

    def _limits_text(self) -> str:
        parts = [] if self.limits.kv is None else [f"KV budget {format_bytes(self.limits.kv)}"]
        if self.limits.device is not None:
            parts.append(f"device memory {self.device_label or format_bytes(self.limits.device)}")
        if self.limits.host is not None:
            parts.append(f"host budget {format_bytes(self.limits.host)}")
        return " and ".join(parts)

    def reproduce_command(self, preset: str | Path = "plan.toml") -> str:
        """The ``kvtool needle`` command that measures the recommendation's retrieval quality at this context.

        ``preset`` is where ``--emit-preset`` wrote (or will write) the plan; the preset carries the
        prefill chunk, so the command needs none.
        """
        context = self.memory_model.context
        length = f"{context // 1024}k" if context % 1024 == 0 else str(context)
        return (f"kvtool needle --model {self.model.info.name} --policy {preset} --policy full --lengths {length} "
                "--protocol context-first")

    def to_toml(self) -> str:
        """The recommendation as a preset TOML document (loadable by ``parse_policy`` / ``CompressedCache``)."""
        return self.policy_spec().to_toml()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plan: inputs, model, candidates, frontier, recommendation, message."""
        mm, info = self.memory_model, self.model.info
        return {
            "budget_bytes": self.budget, "device_memory_bytes": self.limits.device,
            "host_budget_bytes": self.limits.host, "offload": mm.offload if mm.retrieves else None,
            "device_memory": self.device_label, "binding": self.binding, "binding_tier": self.binding_tier,
            "model": {
                "name": info.name, "source": self.model.source, "model_type": info.model_type,
                "layers": info.num_layers, "heads": info.num_heads, "kv_heads": info.num_kv_heads,
                "head_dim": info.head_dim, "sliding_window": info.sliding_window,
                "sliding_layers": sum(w is not None for w in mm.windows), "parameters": self.model.parameters,
            },
            "dtype": mm.dtype, "context": mm.context, "batch": mm.batch, "new_tokens": mm.new_tokens,
            "prefill_chunk": mm.prefill_chunk, "overhead_bytes": mm.overhead, "token_policy": mm.token_policy,
            "gpus": mm.parallel.gpus if mm.parallel else 1, "parallel": mm.parallel.mode if mm.parallel else None,
            "split_rule": mm.parallel.rule if mm.parallel else None,
            "devices": [{"device": s.index, "layers": list(s.layers), "parameters": s.parameters, "logits": s.logits,
                         "heads": s.shape.info.num_heads, "kv_heads": s.shape.info.num_kv_heads}
                        for s in (mm.parallel.shares(self.model) if mm.parallel else ())],
            "min_tokens": self.min_tokens, "quality_source": self.quality_source,
            "quality_kind": self.quality_model.kind, "quality_metric": self.quality_model.metric,
            "candidates": [c.to_dict() for c in self.candidates],
            "frontier": [c.to_dict() for c in self.frontier],
            "recommendation": self.recommendation.to_dict() if self.recommendation else None,
            "fits": self.fits, "message": self.message, "notes": list(self.notes),
        }

    def explain(self) -> str:
        """The memory formula with this plan's numbers substituted (recommendation, else the cheapest point)."""
        point = self.recommendation or min(self.candidates, key=lambda c: self.limits.excess(c.memory))
        m, mm = point.memory.busiest, run_of(self.memory_model, point)
        chunk = f"prefill chunk {mm.prefill_chunk:,}" if mm.prefill_chunk else "prefill in one forward"
        gpu = (f" on GPU {point.memory.devices.index(m)} of {len(point.memory.devices)}, the most loaded (its "
               "heads, layers and weights)" if point.memory.devices else "")
        lines = [
            f"Memory formula for {point.label(mm.seen)} ({mm.batch} × {mm.context:,}-token prompts, "
            f"{mm.new_tokens} new tokens, {mm.dtype}, {chunk}: e = {mm.elem} B, B = {mm.batch}){gpu}:",
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
        lines.append(f"  KV cache at its largest (what the KV budget bounds) = {m.max_kv:,} + {m.projections:,} = "
                     f"{m.cache_peak:,} B ({format_bytes(m.cache_peak)})")
        lines.append(
            f"  constants: ATTENTION_COPIES={ATTENTION_COPIES}, HIDDEN_COPIES={HIDDEN_COPIES}, "
            f"MLP_COPIES={MLP_COPIES}, overhead={format_bytes(mm.overhead)}; the KV terms are exact "
            "(kvpress_aqua.core.accounting), the rest are estimates"
        )
        return "\n".join(lines)

    def curves(self, points: int = 24) -> dict[float, list[tuple[int, float]]]:
        """``k_ratio -> [(KV cache bytes, quality)]`` for knobs from the cheapest to every token (plots).

        The bytes are the most loaded GPU's when the run is split (what a per-GPU budget bounds).
        """
        out = {}
        for c in self.candidates:
            row, mm = [], run_of(self.memory_model, c)
            for knob in [*knob_grid(mm, self.min_tokens, None, points), None]:
                p = point(mm, self.quality_model, c.key_dim, knob, c.prefill_chunk, fits=True, verdict="")
                row.append((p.memory.device_cache_peak, p.quality))
            out[c.k_ratio] = sorted(row)
        return out


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
    budget: int | str | None,
    model: str | Path | PretrainedConfig,
    context: int | str | None = None,
    batch: int = 1,
    new_tokens: int = 0,
    dtype: str | None = None,
    prefill_chunk: int | str | None = None,
    overhead: int | str | None = None,
    *,
    device_memory: int | str | None = None,
    token_policy: str = "h2o",
    min_tokens: int = DEFAULT_MIN_TOKENS,
    quality: QualityModel | None = None,
    artifact: str | Path | None = None,
    host_budget: int | str | None = None,
    offload: str | None = "cpu",
    proxy_dtype: str = "model",
    gpus: int = 1,
    parallel: str = "tp",
) -> Plan:
    """Pick ``k_ratio``, the token budget and the prefill chunk together under a KV-cache budget.

    Parameters
    ----------
    budget : int, str or None
        KV-cache budget: the most the cache may hold at once (keys, values, slot metadata, AQUA
        projections); bytes or a size string (``"8GB"`` = 8*10^9, ``"24GiB"`` = 24*2^30). ``None``
        checks only ``device_memory``.
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
        Prefill chunk size (``CompressedCache(prefill_chunk=...)`` with ``cache.prefill``); default:
        searched over :data:`CHUNK_CHOICES` for the best estimated quality that fits.
    overhead : int or str, optional
        Runtime overhead (bytes or a size string); default :data:`DEFAULT_OVERHEAD`.
    device_memory : int or str, optional
        Also check the whole run (weights + cache + working set + overhead) against this: bytes, a
        size string or a GPU name of :data:`GPU_MEMORY_MIB` (``"h100"``).
    token_policy : str, default "h2o"
        Eviction policy of the plans (:func:`plannable_token_policies`): a token policy of
        :mod:`kvpress_aqua.policies.registry` that takes a budget, sized by its token budget, a
        block summary (``balancekv``, ``uniform``), sized by its ``halvings``, or ``retrieval``,
        sized by its ``top_k`` and proxy rank (:data:`~kvpress_aqua.planner.retrieval.RETRIEVAL_RANKS`).
    min_tokens : int, default 64
        Plans keeping fewer tokens per sequence count as not fitting.
    quality : QualityModel, optional
        Quality source; default: the needle sweep stored beside the model's AQUA artifact, else its
        perplexity sweep, else the artifact's SVD spectrum, else the default curve
        (:attr:`Plan.quality_source` says which and why).
    artifact : str or Path, optional
        The AQUA artifact to read the quality model from; default the one ``kvtool calibrate`` wrote.
    host_budget : int or str, optional
        Retrieval only: the most its tier may hold in host memory at once (bytes or a size string);
        ``None`` does not check it. Not used when the tier is on the device (``offload=None``).
    offload : {"cpu", "none", None}, default "cpu"
        Retrieval only: where its tier lives, host memory (``"cpu"``) or the device.
    proxy_dtype : {"model", "int8"}, default "model"
        Retrieval only: its proxy keys in the model dtype, or int8 with a float32 scale per token.
    gpus : int, default 1
        GPUs the run is split over; with more than one, ``budget`` and ``device_memory`` are per GPU
        and every point's ``memory.devices`` holds each GPU's bytes.
    parallel : {"tp", "pipeline"}, default "tp"
        How ``gpus > 1`` split the run (:mod:`kvpress_aqua.planner.parallel`): tensor parallelism
        (``tp_plan="auto"``: each rank 1/N of the KV heads) or a pipeline (``device_map="auto"``:
        whole layers per GPU).

    Returns
    -------
    Plan

    Raises
    ------
    ValueError
        Bad input, naming the fix: neither budget nor device memory, non-positive budget or context,
        malformed size, unknown GPU, dtype, model or token policy, a block summary on a model
        with sliding-window layers, a host budget, offload or proxy dtype for a policy other than retrieval,
        KV heads that ``gpus`` tensor-parallel ranks cannot split evenly.

    """
    device, device_label = (None, None) if device_memory is None else parse_device_memory(device_memory)
    token_policy = _plannable(token_policy)
    offload = None if offload is None or str(offload).strip().lower() == "none" else str(offload).strip().lower()
    if token_policy != RETRIEVAL and (host_budget is not None or offload != "cpu" or proxy_dtype != "model"):
        raise ValueError(f"--host-budget, --offload and --proxy-dtype size a retrieval tier; {token_policy} keeps none "
                         "(plan it with --token-policy retrieval)")
    host = None if host_budget is None or offload is None else parse_size(host_budget, "host budget")
    limits = Limits(None if budget is None else parse_size(budget, "budget"), device, host)
    gpus = _check_int("gpus", gpus, 1, "--gpus 2")
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"--parallel {parallel!r}: use tp (heads split across ranks) or pipeline (layers per GPU)")
    shape = resolve_model(model)
    split = Parallel(parallel, gpus) if gpus > 1 else None
    if split is not None:
        split.check(shape)
    if context is None:
        if shape.max_position_embeddings is None:
            raise ValueError("the model config has no max_position_embeddings; give the context, e.g. --context 8192")
        context = shape.max_position_embeddings
    tokens = parse_tokens(context, "context")
    batch = _check_int("batch", batch, 1, "--batch 1")
    new_tokens = _check_int("new tokens", new_tokens, 0, "--new-tokens 256")
    chunk = None if prefill_chunk is None else parse_tokens(prefill_chunk, "prefill chunk")
    min_tokens = _check_int("min tokens", min_tokens, 1, "64")
    dtype_name = short_name(dtype or shape.dtype or "float32")
    overhead_bytes = DEFAULT_OVERHEAD if overhead is None else (
        0 if str(overhead).strip() == "0" else parse_size(overhead, "overhead")
    )
    mm = MemoryModel(shape, batch, tokens, new_tokens, dtype_name, chunk, overhead_bytes, token_policy,
                     offload=offload, proxy_dtype=proxy_dtype, parallel=split)
    quality_model = quality or find_quality(shape.info, artifact, token_policy)
    points = _search(mm, quality_model, limits, min_tokens, chunk_choices(tokens, chunk))
    fitting = [c for c in points if c.fits]
    best = next((c for c in points if c.verdict == "recommended"), None)
    pareto = frontier(mm, quality_model, fitting, min_tokens)
    notes = list(shape.notes)
    binds, tier = "", "none"
    if best is not None:
        binds, tier = binding(mm, limits, best)
        host_text = (f", host tier {format_bytes(best.memory.host)} at the end (at most "
                     f"{format_bytes(best.memory.host_peak)})" if best.top_k is not None and mm.offload else "")
        per = " per GPU" if split else ""
        message = (f"fits: {best.label(mm.seen)}, {_chunk_text(best.prefill_chunk)}; KV cache at most "
                   f"{format_bytes(best.memory.device_cache_peak)}{per}{host_text}, predicted peak "
                   f"{format_bytes(best.memory.device_total)}{per}, estimated quality {best.quality:.3f}; {binds}")
    else:
        message = does_not_fit(mm, limits, min_tokens, chunk)
    if chunk is not None:  # the user fixed the chunk: say which chunk would do better
        auto = _search(mm, quality_model, limits, min_tokens, chunk_choices(tokens, None))
        other = next((c for c in auto if c.verdict == "recommended"), None)
        if other is not None and other.prefill_chunk != chunk and (
                best is None or round(other.quality, 3) > round(best.quality, 3)):
            hint = (f"with --prefill-chunk {other.prefill_chunk or tokens} the request fits better: "
                    f"{other.label(mm.seen)}, estimated quality {other.quality:.3f}")
            if best is None:
                message += f"; {hint}"
            else:
                notes.append(hint)
    notes += plan_notes(mm, limits, best, dtype_given=dtype is not None, host_budget=host_budget)
    return Plan(limits, shape, mm, quality_model, min_tokens, tuple(points), tuple(pareto), best, message,
                tuple(notes), device_label, binds, tier)


def plannable_token_policies() -> tuple[str, ...]:
    """The token policies :func:`plan` can size, sorted: budget splits, block summaries and retrieval.

    The registry's token rows that split a budget into knobs (read from
    :data:`kvpress_aqua.policies.registry.POLICY_TYPES`, so a new row is planned without a change
    here), the block summaries of :data:`~kvpress_aqua.planner.summaries.SUMMARY_POLICIES` (sized
    by ``halvings``) and retrieval (sized by ``top_k`` and its proxy rank). Another policy without
    a budget ``split`` is not among them.
    """
    return tuple(sorted(row.name for row in POLICY_TYPES.values()
                        if row.kind == "token" and (row.split or row.name in (*SUMMARY_POLICIES, RETRIEVAL))))


def _plannable(name: str) -> str:
    row = policy_type(name, "token")
    if row.name not in plannable_token_policies():
        raise ValueError(f"token policy {name!r} keeps no token budget, is no block summary nor retrieval, so the "
                         f"planner cannot size it; use --token-policy {' or '.join(plannable_token_policies())}")
    return row.name


def _chunk_text(chunk: int | None) -> str:
    return f"prefill chunk {chunk:,}" if chunk else "prefill in one forward"


def _search(mm: MemoryModel, quality: QualityModel, limits: Limits, min_tokens: int,
            chunks: Sequence[int | None]) -> list[Candidate]:
    """One point per key width (its best chunk, largest knob, retrieval's proxy rank); the best is ``recommended``."""
    points = []
    runs = [replace(mm, rank=r) for r in proxy_ranks(mm.shape.info.head_dim)] if mm.retrieves else [mm]
    for key_dim in candidate_key_dims(mm.shape.info.head_dim):
        options = []
        for run in runs:
            fits, b, c = best_chunk(run, key_dim, limits, min_tokens, chunks,
                                    lambda knob, k=key_dim, r=run: score(r, quality, k, knob))
            options.append(point(run, quality, key_dim, b, c, fits, "fits" if fits else "does not fit"))
        fitting = [c for c in options if c.fits]
        points.append(max(fitting, key=lambda c: (round(c.quality, 9), -c.memory.total)) if fitting
                      else min(options, key=lambda c: limits.excess(c.memory)))
    best = max((c for c in points if c.fits), key=lambda c: (round(c.quality, 9), -c.memory.total), default=None)
    return [replace(c, verdict="recommended") if c is best else c for c in points]

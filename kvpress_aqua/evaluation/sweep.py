"""Measured quality vs ``k_ratio`` x token budget: the calibration sweep the planner reads.

:func:`measure_sweep` runs held-out text through :func:`kvpress_aqua.evaluation.perplexity.perplexity` (the
compressed cache in the loop) once with the full cache and once per grid point, a token policy
keeping ``retained`` of the evaluated tokens stacked with ``Aqua(k_ratio=..., artifact=artifact)``,
and records each point's relative quality ``exp(-(nll - nll_full)) = ppl_full / ppl``.

The sweep is stored as a JSON file next to the AQUA artifact (:func:`sweep_path`:
``<artifact stem>.sweep.json``), with the text (source, sha256, tokens), the chunk, the grid, the
measured perplexity of every point and the fingerprint of the artifact it was measured with
(:func:`artifact_fingerprint`); ``kvtool calibrate --sweep`` writes it and
:func:`kvpress_aqua.planner.plan` reads it (:func:`find_sweep`) when it matches the artifact. The
file format (:class:`QualitySweep`, :class:`SweepPoint`, :func:`find_sweep`...) lives in the
torch-free :mod:`kvpress_aqua.artifacts.sweep`, re-exported here.

What a point measures: perplexity averages over every position of the text, and a position ``t``
sees at most ``budget`` tokens only once ``t > budget``, so a point at ``retained = r`` mixes
positions that lost nothing (the first ``r`` of the text) with positions that kept a fraction
between ``1`` and ``r`` of their past. It is the quality of a whole pass at that budget, milder
than the loss of a single token generated after a prompt of the full length.

:func:`measure_needle_sweep` measures that loss on the same grid: needle prompts of one length
(:mod:`kvpress_aqua.evaluation.needle`: a passkey hidden at several depths, the context prefilled and
compressed before the question comes, ``context-first``), answered greedily through each grid
point's cache and scored by exact match; a point's quality is its mean score over the full cache's.
It is stored beside the artifact as ``<artifact stem>.needle.json``, and the planner ranks by it
when present.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import torch
from transformers import PreTrainedModel

from .._version import __version__
from ..artifacts.aqua import AquaArtifact
from ..artifacts.sweep import QualitySweep, SweepPoint, artifact_fingerprint, find_sweep, sweep_path
from ..data.haystack import Haystack
from ..model_info import ModelInfo
from ..policies.aqua import Aqua
from ..policies.registry import token_entry
from ..presets.spec import PolicySpec
from .needle.runner import RunConfig, run_cells
from .needle.tasks import plan_cells
from .perplexity import perplexity

__all__ = [
    "DEFAULT_K_RATIOS",
    "DEFAULT_NEEDLE_DEPTHS",
    "DEFAULT_NEEDLE_LENGTH",
    "DEFAULT_RETAINED",
    "DEFAULT_SWEEP_CHUNK",
    "DEFAULT_SWEEP_TOKENS",
    "QualitySweep",
    "SweepPoint",
    "artifact_fingerprint",
    "find_sweep",
    "measure_needle_sweep",
    "measure_sweep",
    "sweep_path",
    "token_entry",
]

DEFAULT_K_RATIOS = (1.0, 0.75, 0.5, 0.375, 0.25)
"""Key-channel fractions measured by default: the planner's range (it offers nothing below 0.25)."""
DEFAULT_RETAINED = (1.0, 0.5, 0.25, 0.125)
"""Token budgets measured by default, as fractions of the evaluated tokens (plans often keep a tenth to a third)."""
DEFAULT_SWEEP_TOKENS = 512
"""Tokens of held-out text per grid point by default (20 points; see docs/planner.md for a measured time)."""
DEFAULT_SWEEP_CHUNK = 32
"""Tokens per forward of :func:`~kvpress_aqua.evaluation.perplexity.perplexity` by default."""
DEFAULT_NEEDLE_LENGTH = 1024
"""Prompt tokens of the needle sweep by default (short: it runs beside the perplexity sweep)."""
DEFAULT_NEEDLE_DEPTHS = (10.0, 50.0, 90.0)
"""Needle depths (% of the haystack) of every grid point by default."""
_TOKEN_POLICIES = ("h2o", "sliding")


def _check_grid(name: str, values: Sequence[float]) -> tuple[float, ...]:
    grid = tuple(sorted({float(v) for v in values}, reverse=True))
    if not grid or grid[-1] <= 0 or grid[0] > 1:
        raise ValueError(f"{name} {list(values)}: give fractions in (0, 1], e.g. 1,0.5,0.25")
    return grid


def measure_sweep(
    model: PreTrainedModel,
    tokenizer: Any,
    artifact: AquaArtifact,
    text: str,
    *,
    k_ratios: Sequence[float] = DEFAULT_K_RATIOS,
    retained: Sequence[float] = DEFAULT_RETAINED,
    tokens: int = DEFAULT_SWEEP_TOKENS,
    chunk: int = DEFAULT_SWEEP_CHUNK,
    token_policy: str = "h2o",
    source: str = "user-supplied text",
    on_point: Callable[[SweepPoint], None] | None = None,
) -> QualitySweep:
    """Measure relative quality on a ``k_ratio`` x token-budget grid with the compressed cache in the loop.

    Parameters
    ----------
    model : PreTrainedModel
        The calibrated model, in eval mode.
    tokenizer : callable
        Its tokenizer, called as ``tokenizer(text, add_special_tokens=False)["input_ids"]``.
    artifact : AquaArtifact
        The model's AQUA artifact (:func:`kvpress_aqua.calibration.calibrate.calibrate`); its
        :func:`artifact_fingerprint` is recorded.
    text : str
        Held-out text (not the calibration text); its first ``tokens`` tokens are scored.
    k_ratios : sequence of float
        Fractions of key channels kept, in ``(0, 1]``; 1 runs without AQUA.
    retained : sequence of float
        Token budgets as fractions of the evaluated tokens, in ``(0, 1]``; 1 runs without eviction.
    tokens : int
        Tokens of ``text`` evaluated per point (at least 8).
    chunk : int
        Tokens per forward (:func:`~kvpress_aqua.evaluation.perplexity.perplexity`).
    token_policy : {"h2o", "sliding"}
        Eviction policy of the budgets, split as in :func:`token_entry`.
    source : str
        Where ``text`` comes from, recorded in the metadata.
    on_point : callable, optional
        Called with each :class:`SweepPoint` when it is measured (progress).

    Returns
    -------
    QualitySweep
        Not yet saved (``path`` is ``None``; :func:`sweep_path` gives the file the planner reads).

    Raises
    ------
    ValueError
        Bad grid, too few tokens, unknown token policy, or an artifact of another model.

    """
    if token_policy not in _TOKEN_POLICIES:
        raise ValueError(f"token policy {token_policy!r}: use one of {', '.join(_TOKEN_POLICIES)}")
    k_grid, r_grid = _check_grid("k_ratios", k_ratios), _check_grid("retained", retained)
    info = ModelInfo.from_config(model.config, name=artifact.metadata.get("model"))
    artifact.check_model(info)
    ids = torch.as_tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long).flatten()[:tokens]
    n = int(ids.numel())
    if tokens < 8 or n < 8:
        raise ValueError(f"the sweep needs at least 8 tokens of text, got {min(tokens, n)}; give more text or "
                         "--sweep-tokens 512")
    start = time.perf_counter()
    full = perplexity(model, ids, (), chunk=chunk)
    points = [SweepPoint(1.0, 1.0, None, full.ppl, full.nll, 1.0, round(full.seconds, 2))]
    if on_point is not None:
        on_point(points[0])
    for k in k_grid:
        for r in r_grid:
            if k == 1.0 and r == 1.0:
                continue
            budget = None if r == 1.0 else max(2, round(r * n))
            policies = PolicySpec("sweep", (token_entry(token_policy, budget),)).build() if budget else []
            if k < 1.0:
                policies.append(Aqua(k_ratio=k, artifact=artifact))
            result = perplexity(model, ids, policies, chunk=chunk)
            point = SweepPoint(k, r, budget, result.ppl, result.nll, math.exp(full.nll - result.nll),
                               round(result.seconds, 2))
            points.append(point)
            if on_point is not None:
                on_point(point)
    metadata = {
        "model": info.name,
        "model_fingerprint": info.fingerprint,
        "artifact_fingerprint": artifact_fingerprint(artifact),
        "artifact_file": str(artifact.path) if artifact.path else None,
        "token_policy": token_policy,
        "aqua_exact_sinks": Aqua.exact_sinks,
        "aqua_exact_recent": Aqua.exact_recent,
        "text_source": source,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "tokens": n,
        "chunk": chunk,
        "k_ratios": list(k_grid),
        "retained": list(r_grid),
        "full_ppl": full.ppl,
        "quality": "exp(-(nll - nll_full)) = ppl_full / ppl, over every scored position of the text",
        "seconds": round(time.perf_counter() - start, 2),
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return QualitySweep(tuple(points), metadata)


def _grid_specs(k_grid: Sequence[float], r_grid: Sequence[float], length: int, token_policy: str,
                artifact: AquaArtifact) -> dict[tuple[float, float], PolicySpec]:
    """One spec per grid point: the token policy keeping ``retained`` of ``length`` tokens, AQUA at ``k_ratio``."""
    specs = {}
    for k in k_grid:
        for r in r_grid:
            entries = [] if r == 1.0 else [token_entry(token_policy, max(2, round(r * length)))]
            if k < 1.0:
                entries.append({"type": "aqua", "k_ratio": k, "artifact": str(artifact.path)})
            specs[(k, r)] = PolicySpec(f"k{k:g}-r{r:g}", tuple(entries))
    return specs


def measure_needle_sweep(
    model: PreTrainedModel,
    tokenizer: Any,
    artifact: AquaArtifact,
    haystack: Haystack,
    *,
    k_ratios: Sequence[float] = DEFAULT_K_RATIOS,
    retained: Sequence[float] = DEFAULT_RETAINED,
    length: int = DEFAULT_NEEDLE_LENGTH,
    depths: Sequence[float] = DEFAULT_NEEDLE_DEPTHS,
    prefill_chunk: int | None = 256,
    token_policy: str = "h2o",
    on_point: Callable[[SweepPoint], None] | None = None,
) -> QualitySweep:
    """Measure retrieval (needle exact match) on a ``k_ratio`` x token-budget grid with the cache in the loop.

    Parameters
    ----------
    model : PreTrainedModel
        The calibrated model, in eval mode.
    tokenizer : callable
        Its tokenizer (:class:`~kvpress_aqua.evaluation.needle.prompts.PromptBuilder` builds the prompts).
    artifact : AquaArtifact
        The model's saved AQUA artifact (its path goes into the ``aqua`` entries).
    haystack : Haystack
        Filler text (:func:`kvpress_aqua.data.haystack.load_haystack`).
    k_ratios, retained : sequence of float
        The grid, fractions in ``(0, 1]``; ``retained`` is of the ``length`` prompt tokens.
    length : int
        Prompt tokens.
    depths : sequence of float
        Needle depths in % of the haystack; every point answers one passkey prompt per depth.
    prefill_chunk : int or None
        Prefill chunk of the caches.
    token_policy : {"h2o", "sliding"}
        Eviction policy of the budgets, split as in :func:`token_entry`.
    on_point : callable, optional
        Called with each :class:`SweepPoint` when it is measured (progress).

    Returns
    -------
    QualitySweep
        Not yet saved; ``metadata["metric"] == "needle"``, ``quality = score / score_full``.

    Raises
    ------
    ValueError
        Bad grid, unknown token policy, an artifact of another model or not saved, or a model that
        recalls no needle with the full cache (nothing to measure against: use a longer-context model
        or a shorter ``length``).

    """
    if token_policy not in _TOKEN_POLICIES:
        raise ValueError(f"token policy {token_policy!r}: use one of {', '.join(_TOKEN_POLICIES)}")
    if artifact.path is None:
        raise ValueError("the needle sweep loads the artifact from its file: save it first (artifact.save(path))")
    k_grid, r_grid = _check_grid("k_ratios", k_ratios), _check_grid("retained", retained)
    info = ModelInfo.from_config(model.config, name=artifact.metadata.get("model"))
    artifact.check_model(info)
    specs = _grid_specs(k_grid, r_grid, length, token_policy, artifact)
    by_name = {spec.name: spec for spec in specs.values()}
    config = RunConfig(model=info.name, haystack=haystack, prefill_chunk=prefill_chunk, batch_size=len(depths))
    start = time.perf_counter()
    scores: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}

    def collect(row: dict[str, Any]) -> None:
        scores.setdefault(row["policy"], []).append(float(row["score"]))
        seconds[row["policy"]] = seconds.get(row["policy"], 0.0) + float(row["seconds"])

    full_name = specs[(1.0, 1.0)].name
    run_cells(model, tokenizer, plan_cells([full_name], ["context-first"], ["passkey"], [length], depths),
              by_name, config, collect)
    full = sum(scores[full_name]) / len(scores[full_name])
    if full == 0:
        raise ValueError(f"{info.name} recalls no passkey of {length} tokens with the full cache, so the needle "
                         "sweep has nothing to measure against; give a shorter --needle-length or skip it")
    points = []
    for (k, r), spec in specs.items():
        if spec.name != full_name:
            cells = plan_cells([spec.name], ["context-first"], ["passkey"], [length], depths)
            run_cells(model, tokenizer, cells, by_name, config, collect)
        mean = sum(scores[spec.name]) / len(scores[spec.name])
        budget = None if r == 1.0 else max(2, round(r * length))
        point = SweepPoint(k, r, budget, None, None, mean / full, round(seconds[spec.name], 2), score=mean)
        points.append(point)
        if on_point is not None:
            on_point(point)
    metadata = {
        "metric": "needle",
        "model": info.name,
        "model_fingerprint": info.fingerprint,
        "artifact_fingerprint": artifact_fingerprint(artifact),
        "artifact_file": str(artifact.path),
        "token_policy": token_policy,
        "aqua_exact_sinks": Aqua.exact_sinks,
        "aqua_exact_recent": Aqua.exact_recent,
        "text_source": f"{haystack.name} haystack, passkey needles at depths {', '.join(f'{d:g}' for d in depths)}%",
        "tokens": length,
        "chunk": prefill_chunk,
        "protocol": "context-first",
        "task": "passkey",
        "depths": list(depths),
        "k_ratios": list(k_grid),
        "retained": list(r_grid),
        "full_score": full,
        "quality": "mean exact-match score / the full cache's, context-first passkey prompts",
        "seconds": round(time.perf_counter() - start, 2),
        "package_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return QualitySweep(tuple(points), metadata)

"""The planner's quality model: the estimated fraction of the dense model's quality a plan point keeps.

Scores are an *estimate* of the fraction of the uncompressed model's quality kept, ``1`` meaning no
loss, always reported with their source (:attr:`QualityModel.source`, :attr:`QualityModel.kind`):

1. a sweep stored beside the AQUA artifact, written by ``kvtool calibrate --sweep``
   (:mod:`kvpress_aqua.evaluation.sweep`): the needle sweep (``<artifact stem>.needle.json``: exact-match
   score on passkey prompts relative to the full cache) when there is one, else the perplexity sweep
   (``<artifact stem>.sweep.json``: ``ppl_full / ppl`` on held-out text), each at a grid of ``k_ratio``
   x ``retained`` (fraction of tokens kept), used when it was measured with that artifact and the
   plan's token policy; interpolated bilinearly, linearly down to 0 at 0 below the smallest
   measured ``k_ratio`` or ``retained``, clamped above the largest, capped at 1;
2. else ``q_channels x q_tokens``, where ``q_channels = exp(-ENERGY_BETA x (1 - E)^ENERGY_GAMMA)`` of
   the key energy ``E`` kept by ``k_ratio``: from the artifact's SVD spectrum when one exists, else
   from :data:`DEFAULT_ENERGY` (the mean energy curve measured on SmolLM2-135M). ``ENERGY_BETA`` and
   ``ENERGY_GAMMA`` fit that prototype's perplexity ratios (energy 0.97, 0.93, 0.84 gave
   ppl_dense/ppl 0.96, 0.61, 0.02). ``q_tokens = 1 - (1 - retained)^x`` with ``x`` from
   :func:`retention_exponent`: the policies that rank tokens by attention scores (H2O, and TOVA,
   which is treated like H2O) get one exponent, those that rank by position only (the sliding
   window) another; which is which is the registry's ``needs_scores``
   (:mod:`kvpress_aqua.policies.registry`), so every registered token policy can be planned.
   A block summary (BalanceKV, uniform sampling) ranks no token: it gets the position curve at the
   fraction of tokens it holds, and its source says that no sweep measured it. Retrieval picks the
   tokens a decode step attends by (proxy) attention: it gets the scores curve at the fraction of
   tokens a step attends, its retrieved ones discounted by the key energy of its proxy's rank
   (:func:`kvpress_aqua.planner.points.score`), and its source says no sweep measured it either.

Option 2 is a heuristic, not a measurement: the channel and token losses are assumed independent,
and the token term is not fitted to any model.

Artifacts and sweeps are read with numpy (:mod:`kvpress_aqua.artifacts.aqua`,
:mod:`kvpress_aqua.artifacts.sweep`), never torch.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts.aqua import AquaArtifact, as_float64, find_artifact
from ..artifacts.sweep import find_sweep
from ..model_info import ModelInfo
from ..policies.registry import AQUA_EXACT_RECENT, AQUA_EXACT_SINKS, policy_type
from .retrieval import RETRIEVAL

__all__ = [
    "DEFAULT_ENERGY",
    "ENERGY_BETA",
    "ENERGY_GAMMA",
    "RETENTION_EXPONENT",
    "QualityModel",
    "find_quality",
    "retention_exponent",
]

RETENTION_EXPONENT = {"scores": 8.0, "position": 4.0}
"""``q_tokens = 1 - (1 - retained)^x`` by what a token policy ranks on: attention scores keep 90% at a
quarter of the tokens (H2O; TOVA is assumed to do the same), positions only 68% (a sliding window)."""
ENERGY_BETA = 600.0
ENERGY_GAMMA = 2.7
DEFAULT_ENERGY: tuple[tuple[float, float], ...] = (
    (0.0, 0.0), (0.25, 0.84), (0.375, 0.89), (0.5, 0.93), (0.75, 0.97), (1.0, 1.0),
)
"""Mean key energy kept vs ``k_ratio`` measured on SmolLM2-135M (head_dim 64); the default curve."""


def retention_exponent(token_policy: str) -> float:
    """The exponent ``x`` of ``q_tokens = 1 - (1 - retained)^x`` for a token policy name.

    ``RETENTION_EXPONENT["scores"]`` for the policies the registry says read attention scores (H2O,
    TOVA, SnapKV) and for retrieval (it selects by proxy attention), ``RETENTION_EXPONENT["position"]``
    for the others (the sliding window, and the block summaries); nothing measured the curves of
    retrieval and the block summaries (:func:`find_quality` says so).

    Raises
    ------
    ValueError
        For a name that is not a registered token policy.

    """
    row = policy_type(token_policy, "token")
    return RETENTION_EXPONENT["scores" if row.needs_scores or row.name == RETRIEVAL else "position"]


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Piecewise-linear interpolation, clamped at the ends (``xs`` sorted)."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect_left(xs, x)
    t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[i - 1] + t * (ys[i] - ys[i - 1])


@dataclass(frozen=True)
class QualityModel:
    """Estimated fraction of the dense model's quality kept at a ``k_ratio`` and a token retention.

    Build one with :meth:`default`, :meth:`from_spectrum`, :meth:`from_sweep` or
    :meth:`from_artifact`; pass it to :func:`plan` as ``quality=`` to plug in any source.

    Attributes
    ----------
    source : str
        Where the numbers come from; every plan reports it.
    kind : {"sweep", "spectrum", "default"}
        Which of the three sources it is: measured points, or the heuristic from an artifact's SVD
        spectrum or from the default energy curve.
    energy : tuple of (k_ratio, energy)
        Key energy kept vs ``k_ratio`` (used without a sweep).
    sweep : tuple of (k_ratio, retained, quality)
        Measured points; when present they are used alone.
    metric : {"needle", "perplexity", "heuristic"}
        What the numbers rank by: a needle sweep's exact-match score relative to the full cache, a
        perplexity sweep's ``ppl_full / ppl``, or the heuristic curves.


    """

    source: str
    kind: str = "default"
    energy: tuple[tuple[float, float], ...] = DEFAULT_ENERGY
    sweep: tuple[tuple[float, float, float], ...] = ()
    metric: str = "heuristic"

    @classmethod
    def default(cls, why: str = "") -> QualityModel:
        """The documented default curve (no AQUA artifact for this model); ``why`` is appended to the source."""
        return cls("default heuristic from another model: SmolLM2-135M's key-energy curve and a token-retention "
                   "curve, not measured on this model" + (f"; {why}" if why else ""))

    @classmethod
    def from_spectrum(cls, spectrum: Any, source: str, why: str = "") -> QualityModel:
        """Energy curve from SVD singular values ``(layers, kv_heads, head_dim)``, sorted descending.

        The energy kept by ``r`` channels is ``sum(s[:r]^2) / sum(s^2)``, averaged over layers and KV
        heads; ``why`` (e.g. why no sweep is used) is appended to the source. ``spectrum`` is a numpy
        array or anything :func:`numpy.asarray` takes (a CPU torch tensor included).
        """
        power = as_float64(spectrum) ** 2
        if power.ndim != 3:
            raise ValueError(f"spectrum must be (layers, kv_heads, head_dim), got shape {tuple(power.shape)}")
        kept = (np.cumsum(power, axis=-1) / power.sum(axis=-1, keepdims=True)).mean(axis=(0, 1))
        d = kept.shape[0]
        curve = ((0.0, 0.0),) + tuple(((r + 1) / d, float(kept[r])) for r in range(d))
        text = (f"heuristic from the SVD spectrum energy of {source} and a token-retention curve (the energy-to-"
                "quality curve was fitted on another model, SmolLM2-135M; not measured on this one)")
        return cls(text + (f"; {why}" if why else ""), kind="spectrum", energy=curve)

    @classmethod
    def from_sweep(cls, rows: Iterable[Mapping[str, float]], source: str, metric: str = "perplexity") -> QualityModel:
        """Measured points: mappings with ``k_ratio``, ``retained`` (fraction of tokens kept) and ``quality``.

        ``metric`` names what the quality measures (``"perplexity"`` or ``"needle"``).
        """
        try:
            points = tuple(sorted((float(r["k_ratio"]), float(r["retained"]), float(r["quality"])) for r in rows))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"calibration sweep of {source}: rows need k_ratio, retained, quality ({err})") from None
        if not points:
            raise ValueError(f"calibration sweep of {source} is empty")
        what = "needle sweep" if metric == "needle" else "calibration sweep"
        return cls(f"{what} {source} (measured, interpolated)", kind="sweep", sweep=points, metric=metric)

    @classmethod
    def from_artifact(cls, artifact: Any, where: str, token_policy: str = "h2o") -> QualityModel:
        """The artifact's needle sweep, else its perplexity sweep, else its ``spectrum``, else the default.

        The sweeps are the files :func:`kvpress_aqua.artifacts.sweep.sweep_path` names, used when
        measured with this artifact and ``token_policy`` (:func:`kvpress_aqua.artifacts.sweep.find_sweep`);
        otherwise the source says why they were not used. Retrieval is ranked first: perplexity
        overrates policies whose needle score collapses.
        """
        exact = (AQUA_EXACT_SINKS, AQUA_EXACT_RECENT)
        needle, no_needle = find_sweep(artifact, token_policy, exact_tokens=exact, metric="needle")
        if needle is not None:
            meta = needle.metadata
            return cls.from_sweep(needle.rows(), f"{needle.path} ({len(needle.points)} points, {meta.get('tokens')}"
                                                 f"-token prompts, {meta.get('text_source')}, {token_policy})",
                                  metric="needle")
        found, why = find_sweep(artifact, token_policy, exact_tokens=exact)
        if found is not None:
            meta = found.metadata
            return cls.from_sweep(found.rows(), f"{found.path} ({len(found.points)} points, {meta.get('tokens')} "
                                                f"tokens of {meta.get('text_source')}, {token_policy}); "
                                                f"{no_needle}")

        spectrum = getattr(artifact, "spectrum", None)
        if spectrum is not None:
            return cls.from_spectrum(spectrum, where, why)
        return cls.default(why)

    def channel_energy(self, k_ratio: float) -> float:
        """Key energy kept by storing ``k_ratio`` of the channels."""
        return _interp(k_ratio, [k for k, _ in self.energy], [v for _, v in self.energy])

    def __call__(self, k_ratio: float, retained: float, token_policy: str = "h2o") -> float:
        """Estimated quality in ``[0, 1]`` (1: same as the dense model)."""
        if self.sweep:
            return self._from_sweep(k_ratio, retained)
        channels = math.exp(-ENERGY_BETA * max(0.0, 1.0 - self.channel_energy(k_ratio)) ** ENERGY_GAMMA)
        tokens = 1.0 - (1.0 - min(1.0, retained)) ** retention_exponent(token_policy)
        return channels * tokens

    def _from_sweep(self, k_ratio: float, retained: float) -> float:
        """Bilinear in the measured grid; linear to 0 at 0 below the smallest measured value; clamped above."""
        ratios = sorted({k for k, _, _ in self.sweep})

        def at(k: float) -> float:
            pts = [(r, q) for kk, r, q in self.sweep if kk == k]
            return _interp(retained, *_from_zero([r for r, _ in pts], [q for _, q in pts]))

        value = _interp(k_ratio, *_from_zero(ratios, [at(k) for k in ratios]))
        return min(1.0, max(0.0, value))


def _from_zero(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """Measured points with ``(0, 0)`` added in front when the smallest ``x`` is above 0 (pessimistic extension)."""
    return ([0.0, *xs], [0.0, *ys]) if xs[0] > 0 else (xs, ys)


def find_quality(info: ModelInfo, artifact: str | Path | None, token_policy: str) -> QualityModel:
    """The quality model from the model's AQUA artifact (given, or the one ``kvtool calibrate`` wrote), else default.

    The artifact is read with numpy (``framework="np"``) and checked against ``info`` as the runtime
    checks it (:meth:`~kvpress_aqua.artifacts.aqua.AquaArtifact.check_model`: fingerprint and shapes).

    Raises
    ------
    FileNotFoundError
        If ``artifact`` is given and does not exist.
    ValueError
        If the artifact is corrupted or was calibrated for another model; the message names both
        models and the fix.

    """
    if artifact is not None:
        found = AquaArtifact.load(artifact, framework="np")
        where = f"artifact {artifact}"
    else:
        try:
            found = find_artifact(info, framework="np")
        except FileNotFoundError:
            return _unmeasured(QualityModel.default("no AQUA artifact for this model (`kvtool calibrate --sweep` "
                                                    "makes one and measures the sweep)"), token_policy)
        where = f"AQUA artifact {found.path}"
    found.check_model(info)
    return _unmeasured(QualityModel.from_artifact(found, where, token_policy), token_policy)


def _unmeasured(model: QualityModel, token_policy: str) -> QualityModel:
    """``model``, its source saying so when it ranks a policy without a budget (block summary, retrieval) unmeasured."""
    row = policy_type(token_policy, "token")
    if model.sweep or row.split:
        return model
    if row.name == RETRIEVAL:
        how = ("it is ranked on the attention-score token-retention curve (H2O's) at the fraction of tokens a decode "
               "step attends (sinks, recent and top_k, the top_k counted at the key energy its rank-channel proxy "
               "keeps); neither the proxy's misses nor the needle task are measured")
    else:
        how = ("it is ranked on the position-only token-retention curve (the sliding window's) at the fraction of "
               "tokens it holds")
    return replace(model, source=f"{model.source}; {row.name} is not measured by any sweep (they measure h2o): {how}")

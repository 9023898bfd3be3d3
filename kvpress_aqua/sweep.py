"""Measured quality vs ``k_ratio`` x token budget: the calibration sweep the planner reads.

:func:`measure_sweep` runs held-out text through :func:`kvpress_aqua.perplexity.perplexity` (the
compressed cache in the loop) once with the full cache and once per grid point, a token policy
keeping ``retained`` of the evaluated tokens stacked with ``Aqua(k_ratio=..., artifact=artifact)``,
and records each point's relative quality ``exp(-(nll - nll_full)) = ppl_full / ppl``.

The sweep is stored as a JSON file next to the AQUA artifact (:func:`sweep_path`:
``<artifact stem>.sweep.json``), with the text (source, sha256, tokens), the chunk, the grid, the
measured perplexity of every point and the fingerprint of the artifact it was measured with
(:func:`artifact_fingerprint`); ``kvtool calibrate --sweep`` writes it and
:func:`kvpress_aqua.planner.plan` reads it (:func:`find_sweep`) when it matches the artifact.

What a point measures: perplexity averages over every position of the text, and a position ``t``
sees at most ``budget`` tokens only once ``t > budget``, so a point at ``retained = r`` mixes
positions that lost nothing (the first ``r`` of the text) with positions that kept a fraction
between ``1`` and ``r`` of their past. It is the quality of a whole pass at that budget, milder
than the loss of a single token generated after a prompt of the full length.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from .perplexity import perplexity
from .policies.aqua import Aqua
from .spec import DEFAULT_SINKS, PolicySpec

if TYPE_CHECKING:
    from .calibration import AquaArtifact

__all__ = [
    "DEFAULT_K_RATIOS",
    "DEFAULT_RETAINED",
    "DEFAULT_SWEEP_CHUNK",
    "DEFAULT_SWEEP_TOKENS",
    "QualitySweep",
    "SweepPoint",
    "artifact_fingerprint",
    "find_sweep",
    "measure_sweep",
    "sweep_path",
    "token_entry",
]

FORMAT = "kvpress_aqua.quality_sweep/1"
"""Value of the ``format`` key of every sweep file; bumped when the layout changes."""
DEFAULT_K_RATIOS = (1.0, 0.75, 0.5, 0.375, 0.25)
"""Key-channel fractions measured by default: the planner's range (it offers nothing below 0.25)."""
DEFAULT_RETAINED = (1.0, 0.5, 0.25, 0.125)
"""Token budgets measured by default, as fractions of the evaluated tokens (plans often keep a tenth to a third)."""
DEFAULT_SWEEP_TOKENS = 512
"""Tokens of held-out text per grid point by default (20 points; see docs/planner.md for a measured time)."""
DEFAULT_SWEEP_CHUNK = 32
"""Tokens per forward of :func:`~kvpress_aqua.perplexity.perplexity` by default."""
_TOKEN_POLICIES = ("h2o", "sliding")


def token_entry(kind: str, budget: int, max_sinks: int = DEFAULT_SINKS) -> dict[str, Any]:
    """The token-policy entry for a budget, split as in the shipped presets.

    Parameters
    ----------
    kind : {"h2o", "sliding"}
        ``h2o``: ``DEFAULT_SINKS`` sinks, the rest half heavy hitters and half recent tokens;
        ``sliding``: the sinks and a window.
    budget : int
        Tokens kept per layer, KV head and sequence.
    max_sinks : int
        Cap on the sinks (a model's own sliding window minus one).

    Returns
    -------
    dict
        A :class:`~kvpress_aqua.spec.PolicySpec` entry.

    """
    sinks = max(0, min(DEFAULT_SINKS, budget - 1, max_sinks))
    rest = budget - sinks
    if kind == "sliding":
        return {"type": "sliding", "sinks": sinks, "window": rest}
    recent = rest // 2
    return {"type": "h2o", "heavy": rest - recent, "recent": recent, "sinks": sinks}


def artifact_fingerprint(artifact: AquaArtifact) -> str:
    """sha256 of the artifact's float32 projection matrices: changes whenever the calibration does."""
    data = artifact.projections.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def sweep_path(artifact_path: str | Path) -> Path:
    """Where the sweep of the artifact at ``artifact_path`` lives: ``<artifact stem>.sweep.json`` beside it."""
    path = Path(artifact_path).expanduser()
    return path.with_name(f"{path.stem}.sweep.json")


@dataclass(frozen=True)
class SweepPoint:
    """One measured grid point.

    Attributes
    ----------
    k_ratio : float
        Fraction of key channels kept (1: no AQUA).
    retained : float
        Token budget as a fraction of the evaluated tokens (1: no token policy).
    token_budget : int or None
        The budget in tokens (``None``: every token kept).
    ppl, nll : float
        Perplexity and mean negative log-likelihood per scored token.
    quality : float
        ``exp(-(nll - nll_full))`` = ``ppl_full / ppl`` (1: as the full cache; can exceed 1 slightly).
    seconds : float
        Wall time of the pass.

    """

    k_ratio: float
    retained: float
    token_budget: int | None
    ppl: float
    nll: float
    quality: float
    seconds: float


@dataclass(frozen=True)
class QualitySweep:
    """A measured quality grid and what it was measured on.

    Attributes
    ----------
    points : tuple of SweepPoint
        One per grid point, the full-cache reference (``k_ratio = retained = 1``) included.
    metadata : dict
        JSON-compatible: ``model``, ``model_fingerprint``, ``artifact_fingerprint``, ``token_policy``,
        ``text_source``, ``text_sha256``, ``tokens``, ``chunk``, ``k_ratios``, ``retained``,
        ``full_ppl``, ``seconds``, ``package_version``, ``created``.
    path : Path or None
        The file it was loaded from or last saved to.

    """

    points: tuple[SweepPoint, ...]
    metadata: dict[str, Any]
    path: Path | None = field(default=None, compare=False)

    def rows(self) -> list[dict[str, float]]:
        """``{"k_ratio", "retained", "quality"}`` per point (:meth:`kvpress_aqua.planner.QualityModel.from_sweep`)."""
        return [{"k_ratio": p.k_ratio, "retained": p.retained, "quality": p.quality} for p in self.points]

    def save(self, path: str | Path) -> Path:
        """Write the sweep as JSON (through a temporary file renamed into place); returns the path."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, **self.metadata, "points": [asdict(p) for p in self.points]}
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(data, indent=2) + "\n")
        partial.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> QualitySweep:
        """Read a sweep written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If the file is not a sweep of this format.

        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no quality sweep at {path}; make one with `kvtool calibrate --sweep`")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            points = tuple(SweepPoint(**p) for p in data.pop("points"))
        except (OSError, json.JSONDecodeError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise ValueError(f"{path} is not a quality sweep of format {FORMAT!r} ({err}); "
                             "re-run `kvtool calibrate --sweep`") from None
        data.pop("format")
        return cls(points, data, path)


def find_sweep(artifact: AquaArtifact, token_policy: str = "h2o") -> tuple[QualitySweep | None, str]:
    """The sweep stored beside ``artifact``, if it was measured with it and with ``token_policy``.

    Parameters
    ----------
    artifact : AquaArtifact
        A saved artifact (``artifact.path`` set).
    token_policy : {"h2o", "sliding"}
        The eviction policy the caller plans for.

    Returns
    -------
    tuple
        ``(sweep, "")`` when a matching sweep exists, else ``(None, reason)``: why none is used
        (no file; measured with another calibration or another token policy; unreadable).

    """
    if artifact.path is None:
        return None, "the artifact is not saved, so it has no sweep file"
    path = sweep_path(artifact.path)
    if not path.is_file():
        return None, f"no calibration sweep at {path} (`kvtool calibrate --sweep` measures one)"
    try:
        sweep = QualitySweep.load(path)
    except ValueError as err:
        return None, f"calibration sweep ignored: {err}"
    if sweep.metadata.get("artifact_fingerprint") != artifact_fingerprint(artifact):
        return None, (f"calibration sweep {path} ignored: it was measured with another calibration of this model "
                      "(re-run `kvtool calibrate --sweep`)")
    if sweep.metadata.get("token_policy") != token_policy:
        return None, (f"calibration sweep {path} ignored: it measured {sweep.metadata.get('token_policy')}, "
                      f"the plan uses {token_policy}")
    exact = sweep.metadata.get("aqua_exact_sinks"), sweep.metadata.get("aqua_exact_recent")
    if exact != (Aqua.exact_sinks, Aqua.exact_recent):
        return None, (f"calibration sweep {path} ignored: it measured AQUA with exact sinks/recent tokens {exact}, "
                      f"Aqua now keeps {(Aqua.exact_sinks, Aqua.exact_recent)} (re-run `kvtool calibrate --sweep`)")
    return sweep, ""


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
        The model's AQUA artifact (:func:`kvpress_aqua.calibration.calibrate`); its
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
        Tokens per forward (:func:`~kvpress_aqua.perplexity.perplexity`).
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
    from . import __version__
    from .model_info import ModelInfo

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

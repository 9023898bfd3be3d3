"""The calibration sweep file: the measured quality grid the planner reads, without torch.

A sweep (measured by :func:`kvpress_aqua.sweep.measure_sweep`, written by ``kvtool calibrate --sweep``)
is a JSON file next to its AQUA artifact (:func:`sweep_path`: ``<artifact stem>.sweep.json``): the
text it was measured on (source, sha256, tokens), the chunk, the grid, the measured perplexity of
every point and the fingerprint of the artifact it was measured with (:func:`artifact_fingerprint`).
A needle sweep (:func:`kvpress_aqua.evaluation.sweep.measure_needle_sweep`, metadata ``metric =
"needle"``) has the same layout in ``<artifact stem>.needle.json``: each point's exact-match score on
needle prompts, relative to the full cache. :func:`find_sweep` returns either when it matches the
artifact, the token policy and AQUA's exact tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .aqua import AquaArtifact, as_float32

__all__ = ["FORMAT", "METRICS", "QualitySweep", "SweepPoint", "artifact_fingerprint", "find_sweep", "sweep_path"]

FORMAT = "kvpress_aqua.quality_sweep/1"
"""Value of the ``format`` key of every sweep file; bumped when the layout changes."""


def artifact_fingerprint(artifact: AquaArtifact) -> str:
    """sha256 of the artifact's float32 projection matrices: changes whenever the calibration does.

    The bytes are little-endian and C-ordered, so torch tensors and numpy arrays of the same values
    give the same hash (:func:`~kvpress_aqua.artifact_format.as_float32`).
    """
    return hashlib.sha256(as_float32(artifact.projections).tobytes()).hexdigest()


METRICS = {"ppl": "sweep", "needle": "needle"}
"""A sweep's ``metric`` -> the middle of its file name: ``ppl`` (perplexity, ``<stem>.sweep.json``) or
``needle`` (exact-match retrieval, ``<stem>.needle.json``)."""


def sweep_path(artifact_path: str | Path, metric: str = "ppl") -> Path:
    """Where the ``metric`` sweep of the artifact at ``artifact_path`` lives, beside it.

    ``<artifact stem>.sweep.json`` for perplexity, ``<artifact stem>.needle.json`` for the needle sweep.
    """
    if metric not in METRICS:
        raise ValueError(f"sweep metric {metric!r}: use one of {', '.join(METRICS)}")
    path = Path(artifact_path).expanduser()
    return path.with_name(f"{path.stem}.{METRICS[metric]}.json")


@dataclass(frozen=True)
class SweepPoint:
    """One measured grid point (of a perplexity sweep, or of a needle sweep: ``ppl``, ``nll`` ``None``).

    Attributes
    ----------
    k_ratio : float
        Fraction of key channels kept (1: no AQUA).
    retained : float
        Token budget as a fraction of the evaluated tokens (1: no token policy).
    token_budget : int or None
        The budget in tokens (``None``: every token kept).
    ppl, nll : float or None
        Perplexity and mean negative log-likelihood per scored token (perplexity sweeps).
    quality : float
        Perplexity: ``exp(-(nll - nll_full))`` = ``ppl_full / ppl``; needle: ``score / score_full``
        (1: as the full cache; can exceed 1 slightly).
    seconds : float
        Wall time of the pass.
    score : float or None
        Needle sweeps: the mean exact-match score over the point's prompts.

    """

    k_ratio: float
    retained: float
    token_budget: int | None
    ppl: float | None
    nll: float | None
    quality: float
    seconds: float
    score: float | None = None


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


def find_sweep(
    artifact: AquaArtifact, token_policy: str = "h2o", exact_tokens: tuple[int, int] | None = None,
    metric: str = "ppl",
) -> tuple[QualitySweep | None, str]:
    """The ``metric`` sweep stored beside ``artifact``, if it was measured with it and with ``token_policy``.

    Parameters
    ----------
    artifact : AquaArtifact
        A saved artifact (``artifact.path`` set).
    token_policy : str
        The eviction policy the caller plans for (a registry name).
    exact_tokens : tuple of int, optional
        AQUA's ``(exact_sinks, exact_recent)`` the caller runs with; a sweep measured with others is
        not used. ``None`` does not check.
    metric : {"ppl", "needle"}
        Which sweep: perplexity or needle retrieval (:func:`sweep_path`).

    Returns
    -------
    tuple
        ``(sweep, "")`` when a matching sweep exists, else ``(None, reason)``: why none is used
        (no file; measured with another calibration, token policy or exact tokens; unreadable).

    """
    if artifact.path is None:
        return None, "the artifact is not saved, so it has no sweep file"
    path = sweep_path(artifact.path, metric)
    what = "needle sweep" if metric == "needle" else "calibration sweep"
    if not path.is_file():
        return None, f"no {what} at {path} (`kvtool calibrate --sweep` measures one)"
    try:
        sweep = QualitySweep.load(path)
    except ValueError as err:
        return None, f"calibration sweep ignored: {err}"
    if sweep.metadata.get("metric", "ppl") != metric:
        return None, f"{path} ignored: it holds a {sweep.metadata.get('metric')} sweep, not {metric}"
    if sweep.metadata.get("artifact_fingerprint") != artifact_fingerprint(artifact):

        return None, (f"calibration sweep {path} ignored: it was measured with another calibration of this model "
                      "(re-run `kvtool calibrate --sweep`)")
    if sweep.metadata.get("token_policy") != token_policy:
        return None, (f"calibration sweep {path} ignored: it measured {sweep.metadata.get('token_policy')}, "
                      f"the plan uses {token_policy}")
    exact = sweep.metadata.get("aqua_exact_sinks"), sweep.metadata.get("aqua_exact_recent")
    if exact_tokens is not None and exact != tuple(exact_tokens):
        return None, (f"calibration sweep {path} ignored: it measured AQUA with exact sinks/recent tokens {exact}, "
                      f"Aqua now keeps {tuple(exact_tokens)} (re-run `kvtool calibrate --sweep`)")
    return sweep, ""

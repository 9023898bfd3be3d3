"""AQUA calibration: the per-layer, per-KV-head orthogonal bases that concentrate query/key energy.

Offline half of AQUA (arXiv 2509.11155). A forward pass over calibration text records the
**post-RoPE** queries and keys each attention layer sees (:mod:`kvpress_aqua.calibration.recorder`);
for every layer and KV head the keys and the queries of its GQA group are stacked into ``X`` and the
eigenvectors of ``XᵀX`` (the right singular vectors of ``X``), sorted by decreasing eigenvalue, form
an orthogonal ``P``. Online, queries and keys are rotated by ``P`` (``x @ P``) and only the leading
channels of rotated keys are stored (:class:`kvpress_aqua.policies.aqua.Aqua`).

Keys and queries are normalized before stacking so that both sets weigh the same: with ``K`` the
``(n, head_dim)`` keys of one KV head and ``Q`` the ``(g * n, head_dim)`` queries of its group,

    ``XᵀX = KᵀK / ||K||²_F + QᵀQ / ||Q||²_F``

(each set scaled to unit total squared norm; equivalently to unit mean squared norm and averaged
over its vectors). Without this, queries would outweigh keys ``g``-fold by count alone, and the set
with the larger norms would choose the basis. Only the ``(head_dim, head_dim)`` Gram matrices are
accumulated, in float64, so memory does not grow with the amount of text.

The result is an :class:`~kvpress_aqua.artifacts.aqua.AquaArtifact`, saved as safetensors under
:func:`~kvpress_aqua.artifacts.aqua.default_artifact_path` by ``kvtool calibrate``; the file format
(write, read, integrity checks, lookup) lives in the torch-free :mod:`kvpress_aqua.artifacts.aqua`.
The default text is :func:`kvpress_aqua.data.calibration_text.default_calibration_text`.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import torch
import transformers
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import PreTrainedModel

from .._version import __version__
from ..artifacts.aqua import SHAPE_KEYS, AquaArtifact
from ..model_info import ModelInfo
from .recorder import GramRecorder, recording

__all__ = ["ORTHOGONALITY_TOL", "calibrate"]

ORTHOGONALITY_TOL = 1e-6
"""Largest ``|PᵀP - I|`` entry (float64) accepted for a computed basis."""


def calibrate(
    model: PreTrainedModel,
    tokenizer: Any,
    text: str,
    tokens: int = 16384,
    chunk: int = 512,
    progress: bool = True,
    *,
    position_span: int = 2048,
    seed: int = 0,
    name: str | None = None,
    source: str = "user-supplied text",
    on_chunk: Callable[[int, int], None] | None = None,
) -> AquaArtifact:
    """Compute the AQUA bases of ``model`` from the post-RoPE queries and keys it produces on ``text``.

    The first ``tokens`` tokens of ``text`` are split into chunks of ``chunk`` tokens, each run
    through the model on its own (no cache), so memory is bounded by one chunk. Each chunk's positions
    start at a random offset in ``[0, position_span - chunk]``: attention inside the chunk is unchanged
    (RoPE is relative), but the keys are rotated by the phases of positions up to ``position_span``, the
    range the basis will serve, not only ``0 .. chunk - 1``. The model's attention implementation is
    switched to a recording copy of sdpa for the duration and restored afterwards, even on error.

    Parameters
    ----------
    model : PreTrainedModel
        A decoder whose attention goes through ``transformers``' ``AttentionInterface``; in eval mode.
    tokenizer : callable
        Its tokenizer; called as ``tokenizer(text, add_special_tokens=False)["input_ids"]``.
    text : str
        Calibration text; :func:`kvpress_aqua.data.calibration_text.default_calibration_text`
        gives a default.
    tokens : int, default 16384
        Tokens of ``text`` used (fewer if the text is shorter).
    chunk : int, default 512
        Tokens per forward pass.
    position_span : int, default 2048
        Positions the chunks are spread over (at least ``chunk``; capped by the model's
        ``max_position_embeddings``). ``chunk`` gives the plain ``0 .. chunk - 1`` of every chunk.
    seed : int, default 0
        Seed of the chunks' position offsets.
    progress : bool, default True
        Show a progress bar on stderr (``kvtool calibrate`` turns it off and draws its own from ``on_chunk``).
    name : str, optional
        Model name recorded in the metadata; default ``model.config.name_or_path``.
    source : str
        Where ``text`` comes from, recorded in the metadata.
    on_chunk : callable, optional
        Called after each forward with the tokens it recorded and the tokens recorded in all
        (``min(tokens, tokens of the text)``), for progress bars.

    Returns
    -------
    AquaArtifact
        Not yet saved (``path`` is ``None``).

    """
    if tokens < 1 or chunk < 1:
        raise ValueError(f"tokens ({tokens}) and chunk ({chunk}) must be positive")
    if position_span < chunk:
        raise ValueError(f"position_span ({position_span}) must be at least the chunk ({chunk}) it spreads")
    max_positions = getattr(model.config, "max_position_embeddings", None) or position_span
    position_span = max(chunk, min(position_span, max_positions))
    info = ModelInfo.from_config(model.config, name=name)
    ids = torch.as_tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long).flatten()
    ids = ids[:tokens]
    if ids.numel() < 2:
        raise ValueError(f"the calibration text gives {ids.numel()} token(s); give at least a few sentences")
    chunks = list(ids.split(chunk))
    device = next(model.parameters()).device
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    recorder = GramRecorder(info)
    bar = Progress(
        TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True, disable=not progress,
    )
    with bar, recording(model, recorder), torch.inference_mode():
        task = bar.add_task("calibrate", total=len(chunks))
        generator = torch.Generator().manual_seed(seed)
        for piece in chunks:
            offset = int(torch.randint(0, position_span - piece.numel() + 1, (1,), generator=generator))
            positions = torch.arange(offset, offset + piece.numel(), device=device)[None]
            model(input_ids=piece[None].to(device), position_ids=positions, use_cache=False, **extra)
            bar.advance(task)
            if on_chunk is not None:
                on_chunk(piece.numel(), ids.numel())
    missing = sorted(set(range(info.num_layers)) - set(recorder.keys))
    if missing:
        raise ValueError(f"no queries/keys were recorded for layers {missing}: does the model use AttentionInterface?")
    projections, spectrum = _bases(recorder)
    used = int(ids.numel())
    return AquaArtifact(
        projections=projections,
        spectrum=spectrum,
        query_norms=_channel_rms(recorder.queries, info.group_size * used),
        key_norms=_channel_rms(recorder.keys, used),
        metadata={
            "model": info.name,
            "fingerprint": info.fingerprint,
            "model_type": info.model_type,
            **{key: getattr(info, key) for key in SHAPE_KEYS},
            "keys_post_rope": True,
            "normalization": "X^T X = K^T K / ||K||_F^2 + Q^T Q / ||Q||_F^2 per KV head (GQA group queries)",
            "text_source": source,
            "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "text_chars": len(text),
            "tokens": used,
            "chunk": chunk,
            "position_span": position_span,
            "seed": seed,
            "package_version": __version__,
            "transformers_version": transformers.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )


def _bases(recorder: GramRecorder) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decompose the normalized Gram matrices: ``P`` (columns by decreasing eigenvalue) and singular values."""
    layers = range(len(recorder.keys))
    keys = torch.stack([recorder.keys[i].cpu() for i in layers])  # (layers, kv_heads, d, d)
    queries = torch.stack([recorder.queries[i].cpu() for i in layers])

    def unit(gram: torch.Tensor) -> torch.Tensor:
        return gram / gram.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]

    eigenvalues, vectors = torch.linalg.eigh(unit(keys) + unit(queries))  # ascending
    eigenvalues, vectors = eigenvalues.flip(-1), vectors.flip(-1)
    # Fix each column's sign (largest-magnitude entry positive) so the same data gives the same file.
    vectors = vectors * vectors.gather(-2, vectors.abs().argmax(-2, keepdim=True)).sign()
    eye = torch.eye(vectors.shape[-1], dtype=vectors.dtype)
    error = (vectors.transpose(-2, -1) @ vectors - eye).abs().max().item()
    if error > ORTHOGONALITY_TOL:
        raise RuntimeError(f"calibration produced a basis {error:.1e} away from orthogonal; the Gram matrix is broken")
    return vectors.float(), eigenvalues.clamp_min(0).sqrt().float()


def _channel_rms(grams: dict[int, torch.Tensor], count: int) -> torch.Tensor:
    """Root mean square of each raw channel, from the Gram diagonals ``(layers, kv_heads, d)``."""
    diagonals = torch.stack([grams[i].cpu().diagonal(dim1=-2, dim2=-1) for i in range(len(grams))])
    return (diagonals / count).sqrt().float()

"""AQUA: store keys in a calibrated orthogonal basis, cut to their leading channels."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifacts.aqua import AquaArtifact, find_artifact
from ..model_info import ModelInfo
from .base import ChannelPolicy
from .registry import AQUA_EXACT_RECENT, AQUA_EXACT_SINKS

_BASES = ("svd", "identity", "think")
_SPLITS = ("uniform", "spectrum")
CHANNEL_MULTIPLE = 8
"""Stored key widths are multiples of this (kernel-friendly); the last layer of a split may differ."""


def smallest_key_width(head_dim: int) -> int:
    """The fewest key channels :class:`Aqua` stores: :data:`CHANNEL_MULTIPLE` (8), a quarter of a head narrower than 32.

    Every released model has heads of 64 channels or more, so 8 is the rule; the quarter is for
    test-size heads (8 or 16 channels), which could not keep 8 of anything else.
    """
    return CHANNEL_MULTIPLE if head_dim >= 4 * CHANNEL_MULTIPLE else max(1, head_dim // 4)


@dataclass
class Aqua(ChannelPolicy):
    """Store the leading ``k_ratio`` of key channels in a calibrated basis; pick query channels at run time.

    Based on "AQUA: Attention via QUery mAgnitudes for memory and compute efficient inference in
    LLMs" (arXiv 2509.11155). Offline, an SVD of calibration queries and keys gives an orthogonal
    ``P`` per layer and KV head (``kvtool calibrate``); online keys ``(batch, kv_heads, seq, head_dim)``
    are stored as ``K @ P[:, :r]`` with ``r = round(k_ratio * head_dim)`` and queries are projected
    the same way, so ``q·k`` is approximated by the leading ``r`` channels of the rotated space.

    Parameters
    ----------
    k_ratio : float, default 0.5
        Fraction of key channels **kept** in memory (memory mode). 1 keeps all (exact attention).
    q_ratio : float, default 1.0
        Fraction of the stored channels each query keeps, chosen per query by ``|projected q|``
        (compute mode). The dropped channels are zeroed: same result as skipping them, but this
        PyTorch path does not save the FLOPs (a kernel would).
    per_layer : {"uniform", "spectrum"}
        ``uniform`` stores ``r`` channels in every layer; ``spectrum`` spreads the same total over
        layers, keeping the channel blocks of 8 that hold the most calibration energy overall.
    basis : {"svd", "identity", "think"}
        ``svd`` is AQUA. ``identity`` keeps the first raw channels (plain slicing) and ``think`` the
        raw channels with the largest calibration ``|q_c|·|k_c|`` (ThinK, arXiv 2407.21018): both
        are ablations at the same bytes.
    artifact : path or AquaArtifact, optional
        Calibration artifact; by default the one ``kvtool calibrate`` wrote for this model.
    exact_sinks : int, default 4
        The first real tokens of each sequence (attention sinks) also keep their dropped channels,
        so attention to them is exact.
    exact_recent : int, default 64
        The most recent tokens before the current chunk also keep their dropped channels (a ring of
        ``(batch, kv_heads, exact_recent, head_dim - r)`` per layer); older tokens keep ``r`` only.
        0 and 0 store every token pruned (the paper's memory mode).

    Notes
    -----
    Values are untouched. The tokens of the chunk being processed attend to each other with raw
    (exact) keys before their keys are stored pruned. Memory: the projections ``(kv_heads, head_dim,
    r)`` per layer (``head_dim`` columns with exact tokens) are held in the model dtype and counted
    by :meth:`nbytes`; the exact tokens' dropped channels are counted as key bytes by the cache.

    The narrowest stored key is :data:`CHANNEL_MULTIPLE` (8) channels (:func:`smallest_key_width`; a
    quarter of a test-size head narrower than 32): binding refuses a ``k_ratio`` that keeps fewer
    (``Aqua(k_ratio=0.01)`` on a 64-channel head would keep one; ``k_ratio >= 0.125`` there).
    The spectrum split hands out channels in blocks of 8 (every layer keeps at
    least its first block, so a smaller total could not be honoured), the fused kernel pads a key
    narrower than 16 channels to 16 lanes (fewer would save memory but no time), and a ``q·k``
    estimated from a handful of rotated channels ranks keys by little more than noise.

    Known limitations: the basis is fixed offline, so text far from the calibration text is
    compressed less well; ``q_ratio < 1`` saves no time in this implementation.

    """

    k_ratio: float = 0.5
    q_ratio: float = 1.0
    per_layer: str = "uniform"
    basis: str = "svd"
    artifact: str | Path | AquaArtifact | None = None
    exact_sinks: int = AQUA_EXACT_SINKS
    exact_recent: int = AQUA_EXACT_RECENT
    _kept_basis: list[torch.Tensor] = field(init=False, default_factory=list, repr=False, compare=False)
    _dropped_basis: list[torch.Tensor] = field(init=False, default_factory=list, repr=False, compare=False)
    _dims: list[int] = field(init=False, default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.k_ratio <= 1:
            raise ValueError(f"Aqua(k_ratio={self.k_ratio}): the fraction of key channels kept must be in (0, 1]")
        if not 0 < self.q_ratio <= 1:
            raise ValueError(f"Aqua(q_ratio={self.q_ratio}): the fraction of query channels used must be in (0, 1]")
        if self.per_layer not in _SPLITS:
            raise ValueError(f"Aqua(per_layer={self.per_layer!r}): use one of {_SPLITS}")
        if self.basis not in _BASES:
            raise ValueError(f"Aqua(basis={self.basis!r}): use one of {_BASES}")
        for knob in ("exact_sinks", "exact_recent"):
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Aqua({knob}={value!r}): give a token count >= 0 (0 turns it off)")

    def bind(self, info: ModelInfo, device: torch.device, dtype: torch.dtype, heads: range | None = None) -> None:
        """Load the artifact for ``info``'s model and keep ``P[:, :, :r]`` per layer on ``device``.

        With exact tokens the other columns ``P[:, :, r:]`` are kept as well (their residual keys).
        ``heads`` (a tensor-parallel rank's share of the KV heads) keeps those heads' bases only;
        :meth:`place` then moves each layer's bases to the device its keys arrive on.
        """
        d = info.head_dim
        heads = range(info.num_kv_heads) if heads is None else heads
        artifact = self._load_artifact(info) if self.basis != "identity" or self.per_layer == "spectrum" else None
        self._dims = self._split(info, artifact)
        self._kept_basis, self._dropped_basis = [], []
        exact = self.exact_sinks + self.exact_recent > 0
        for layer, r in enumerate(self._dims):
            if self.basis == "svd":
                basis = artifact.projections[layer]
            elif self.basis == "identity":
                basis = torch.eye(d).expand(info.num_kv_heads, d, d)
            else:
                importance = artifact.query_norms[layer] * artifact.key_norms[layer]  # (kv_heads, d)
                order = importance.argsort(dim=-1, descending=True)
                chosen = torch.cat([order[:, :r].sort(dim=-1).values, order[:, r:]], dim=-1)
                basis = torch.eye(d)[:, chosen].permute(1, 0, 2)  # (kv_heads, d, d), kept columns first
            basis = basis[heads.start:heads.stop]
            self._kept_basis.append(basis[:, :, :r].to(device=device, dtype=dtype).contiguous())
            if exact:  # (kv_heads, d, 0) for a layer that keeps every channel
                self._dropped_basis.append(basis[:, :, r:].to(device=device, dtype=dtype).contiguous())

    def place(self, layer_idx: int, device: torch.device) -> None:
        """Move one layer's bases to ``device`` (a no-op where they already are)."""
        self._kept_basis[layer_idx] = self._kept_basis[layer_idx].to(device)
        if self._dropped_basis:
            self._dropped_basis[layer_idx] = self._dropped_basis[layer_idx].to(device)

    def _load_artifact(self, info: ModelInfo) -> AquaArtifact:
        if self.artifact is None:
            artifact = find_artifact(info)
        elif isinstance(self.artifact, AquaArtifact):
            artifact = self.artifact
        else:
            artifact = AquaArtifact.load(self.artifact)
        artifact.check_model(info)
        return artifact

    def _split(self, info: ModelInfo, artifact: AquaArtifact | None) -> list[int]:
        d, layers = info.head_dim, info.num_layers
        r = max(1, min(d, round(self.k_ratio * d)))
        smallest = smallest_key_width(d)
        if r < smallest:
            raise ValueError(
                f"Aqua(k_ratio={self.k_ratio:g}) keeps {r} of the {d} key channels of {info.name}; the smallest "
                f"width is {smallest} channels (k_ratio >= {smallest / d:g} here): channels are split in blocks of "
                f"{CHANNEL_MULTIPLE} and the fused kernel pads narrower keys to 16 lanes, so fewer saves memory but "
                "no time, and would rank keys by a q·k from almost no channels"
            )
        if self.per_layer == "uniform":
            return [r] * layers
        # Blocks of CHANNEL_MULTIPLE leading channels, ranked by their share of each layer's energy
        # (mean over KV heads); singular values are sorted, so a layer's chosen blocks form a prefix.
        energy = artifact.spectrum.double().pow(2)
        share = (energy / energy.sum(-1, keepdim=True)).mean(1)  # (layers, d)
        blocks = share.view(layers, d // CHANNEL_MULTIPLE, CHANNEL_MULTIPLE).sum(-1)
        total = layers * r // CHANNEL_MULTIPLE
        # every layer keeps its first block; the other blocks compete across layers
        rest = blocks[:, 1:].flatten().topk(max(0, total - layers)).indices
        counts = 1 + torch.bincount(rest // (blocks.shape[1] - 1), minlength=layers)
        return [int(c) * CHANNEL_MULTIPLE for c in counts]

    def key_dim(self, layer_idx: int) -> int:
        """Stored key channels of a layer."""
        return self._dims[layer_idx]

    def key_basis(self, layer_idx: int) -> torch.Tensor:
        """``P[:, :, :r]`` of a layer, ``(kv_heads, head_dim, r)``."""
        return self._kept_basis[layer_idx]

    def residual_basis(self, layer_idx: int) -> torch.Tensor:
        """``P[:, :, r:]``: the channels the stored keys drop (bound with exact tokens only)."""
        return self._dropped_basis[layer_idx]

    def query_channels(self, layer_idx: int) -> int | None:
        """``ceil(q_ratio * r)`` channels per projected query, or ``None`` when ``q_ratio`` is 1."""
        keep = math.ceil(self.q_ratio * self._dims[layer_idx])
        return None if keep >= self._dims[layer_idx] else keep

    def tensors(self) -> list[torch.Tensor]:
        """The stored projections: every layer's kept bases, then its dropped ones (with exact tokens)."""
        return [*self._kept_basis, *self._dropped_basis]


"""Two-tier retrieval: every token kept in a second tier, a low-rank proxy picks the few each decode step reads."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..artifacts.aqua import AquaArtifact, find_artifact
from ..model_info import ModelInfo
from .base import SlotView, TokenPolicy
from .sliding_window import recency_priority

_PROXIES = ("aqua", "lrqk")
_OFFLOADS = ("cpu", None)
_PROXY_DTYPES = ("model", "int8")
INT8_SCALE_BYTES = 4
"""Bytes of the float32 scale an int8 proxy key carries per token."""


@dataclass
class Retrieval(TokenPolicy):
    """Keep every token in a second tier; each decode step attends to sinks, recent tokens and the ``top_k`` best.

    Based on LRQK (arXiv 2510.23649: low-rank query and key proxies, a CPU tier with hit/miss
    fetching), with the query-time selection of Quest (arXiv 2406.10774) and ShadowKV (arXiv
    2410.21465). The layer holds, on the accelerator, the ``sinks`` first and ``recent`` latest
    tokens (its held slots, ranked like
    :class:`~kvpress_aqua.policies.sliding_window.SlidingWindow`), a ``rank``-channel proxy key of
    every token and the working set of the last step; the full keys and values of every token live
    in a tier the cache owns (:class:`~kvpress_aqua.core.tier.RetrievalTier`): pinned host memory
    when ``offload="cpu"`` and the model is on a GPU. A decode step scores every other token by its
    proxy attention weight (per query head, normalized, the maximum over the KV group:
    :func:`~kvpress_aqua.ops.retrieval.proxy_scores`), retrieves the ``top_k`` per sequence and KV
    head (only the rows the working set lacks are copied) and attends exactly over held +
    retrieved rows. A chunk of several queries (prefill, a question) attends to every
    earlier token (dense prefill, as in LRQK, Quest and ShadowKV).

    Shapes: proxy keys ``(batch, kv_heads, seq, rank)``, tier rows ``(batch, kv_heads, seq, head_dim)``
    (keys at their stored width under :class:`~kvpress_aqua.policies.aqua.Aqua`).

    Parameters
    ----------
    top_k : int, default 256
        Tokens retrieved per sequence, layer and KV head at each decode step.
    recent : int, default 64
        Latest tokens always attended (held on the accelerator).
    sinks : int, default 4
        First real tokens always attended.
    proxy : {"lrqk", "aqua"}
        ``aqua``: the leading ``rank`` channels of the calibrated AQUA basis (``kvtool calibrate``),
        fixed and prompt-independent, queries projected the same way. ``lrqk``: a per-prompt basis,
        the top ``rank`` eigenvectors of ``KᵀK`` of the first chunk's keys of each sequence and KV
        head (the subspace LRQK's alternating least squares converge to; fit once, not updated per step).
    rank : int, default 16
        Proxy channels per KV head.
    proxy_dtype : {"model", "int8"}
        How proxy keys are stored: in the model dtype, or as int8 with a float32 scale per token
        (symmetric rounding by the row's largest magnitude): four times more channels for the bytes
        of an fp32 model, twice for bf16.
    offload : {"cpu", None}
        ``"cpu"``: the tier in host memory (accounted apart from the accelerator); ``None`` (or
        ``"none"``, for TOML, which has no null): the tier
        stays on the accelerator and each step still reads only the proxy and the selected rows
        (Quest's trade: speed, no memory saving).
    artifact : path or AquaArtifact, optional
        The calibration artifact of the ``aqua`` proxy; by default the one ``kvtool calibrate`` wrote.
    kv_fraction : float, optional
        Size ``top_k`` so that the accelerator's keys and values (held slots, working set, proxy
        keys) take this fraction of the dense KV bytes of ``context`` tokens; set per layer when
        the cache is built (:meth:`prepare`), from the stored key width of that layer.
    context : int, optional
        The context ``kv_fraction`` refers to (required with it).

    Notes
    -----
    Known limits: selection is per KV head, pooled over its query heads by the maximum; a chunk's
    attention over an offloaded tier streams the earlier rows to the accelerator in blocks (one
    attention call each, merged by log-sum-exp; not overlapped with compute); the growing
    cache's host-to-device copies are
    synchronous (no side stream); retrieved rows are gathered and concatenated with the held slots
    before the attention (not fused into the kernel). A static cache
    (:meth:`~kvpress_aqua.core.cache.CompressedCache.make_static`, compiled decoding) reads every
    chosen row from the tier at every step (no working set; an offloaded tier over PCIe, through a
    device view of its pinned memory).

    """

    top_k: int = 256
    recent: int = 64
    sinks: int = 4
    proxy: str = "lrqk"
    rank: int = 16
    proxy_dtype: str = "model"
    offload: str | None = "cpu"
    artifact: str | Path | AquaArtifact | None = None
    kv_fraction: float | None = None
    context: int | None = None
    retrieves = True
    _bases: list[torch.Tensor] = field(init=False, default_factory=list, repr=False, compare=False)
    _top_k: list[int] = field(init=False, default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        for knob in ("top_k", "recent", "rank"):
            if getattr(self, knob) < 1:
                raise ValueError(f"Retrieval({knob}={getattr(self, knob)}): give a positive token count")
        if self.sinks < 0:
            raise ValueError(f"Retrieval(sinks={self.sinks}): sinks must be >= 0")
        if self.proxy not in _PROXIES:
            raise ValueError(f"Retrieval(proxy={self.proxy!r}): use one of {_PROXIES}")
        if self.proxy_dtype not in _PROXY_DTYPES:
            raise ValueError(f"Retrieval(proxy_dtype={self.proxy_dtype!r}): use one of {_PROXY_DTYPES}")
        if self.offload == "none":
            self.offload = None
        if self.offload not in _OFFLOADS:
            raise ValueError(f"Retrieval(offload={self.offload!r}): use 'cpu' (host tier) or None (all on device)")
        if (self.kv_fraction is None) != (self.context is None):
            raise ValueError("Retrieval: kv_fraction and context go together (the fraction of dense bytes of "
                             "`context` tokens); give both or neither")
        if self.kv_fraction is not None and not 0 < self.kv_fraction <= 1:
            raise ValueError(f"Retrieval(kv_fraction={self.kv_fraction}): give a fraction in (0, 1]")

    @property
    def budget(self) -> int:
        """Held slots: ``sinks + recent`` (the retrieved rows are the working set, apart)."""
        return self.sinks + self.recent

    def priority(self, view: SlotView) -> torch.Tensor:
        """Newer is kept first; sinks always (evicted tokens stay in the tier)."""
        return recency_priority(view, self.sinks)

    def check(self, info: ModelInfo) -> None:
        """Refuse a proxy wider than the head."""
        if self.rank > info.head_dim:
            raise ValueError(f"Retrieval(rank={self.rank}) is wider than {info.name}'s {info.head_dim}-channel heads; "
                             f"use rank <= {info.head_dim}")

    def prepare(self, info: ModelInfo, device: torch.device, dtype: torch.dtype, key_dims: Sequence[int],
                exact_tokens: int = 0, heads: range | None = None) -> None:
        """Bind the proxy basis (``aqua``) and size ``top_k`` per layer (``kv_fraction``); called once per cache.

        Parameters
        ----------
        key_dims : sequence of int
            The stored key width of each layer (the channel policy's; ``head_dim`` without one).
        exact_tokens : int
            AQUA's exact tokens per layer and KV head (their dropped channels count against the fraction).
        heads : range, optional
            The KV heads this process holds (a tensor-parallel rank's share): the bases keep those.

        """
        self._bases = []
        if self.proxy == "aqua":
            artifact = self.artifact if isinstance(self.artifact, AquaArtifact) else (
                find_artifact(info) if self.artifact is None else AquaArtifact.load(self.artifact))
            artifact.check_model(info)
            kept = slice(None) if heads is None else slice(heads.start, heads.stop)
            self._bases = [p[kept, :, :self.rank].to(device=device, dtype=dtype).contiguous()
                           for p in artifact.projections]
        elem = torch.empty(0, dtype=dtype).element_size()
        self._top_k = [self._sized(info, r, exact_tokens, elem) for r in key_dims]

    def proxy_nbytes(self, elem: int) -> int:
        """Bytes of one token's proxy key for one KV head (``elem``: the model dtype's size)."""
        return self.rank + INT8_SCALE_BYTES if self.proxy_dtype == "int8" else self.rank * elem

    def _sized(self, info: ModelInfo, key_dim: int, exact_tokens: int, elem: int) -> int:
        if self.kv_fraction is None:
            return self.top_k
        d, context = info.head_dim, self.context
        # keys + values of held and retrieved rows, the proxy of every token, AQUA's dropped channels
        spare = (self.kv_fraction * context * 2 * d - context * self.proxy_nbytes(elem) / elem
                 - exact_tokens * (d - key_dim))
        top_k = math.floor(spare / (key_dim + d)) - self.budget
        if top_k < 1:
            raise ValueError(
                f"Retrieval(kv_fraction={self.kv_fraction}, context={context}, rank={self.rank}) leaves no room to "
                f"retrieve on {info.name}: the proxy alone takes {self.proxy_nbytes(elem) / (2 * d * elem):.1%} of "
                "dense and the "
                f"{self.budget} held tokens the rest; raise kv_fraction or lower rank, sinks or recent"
            )
        return top_k

    def layer_top_k(self, layer_idx: int) -> int:
        """Rows retrieved per step on a layer (``top_k``, or its size from ``kv_fraction``)."""
        return self._top_k[layer_idx] if self._top_k else self.top_k

    @property
    def per_prompt(self) -> bool:
        """Whether the proxy basis is fit on each prompt's first keys (``lrqk``) rather than calibrated."""
        return self.proxy == "lrqk"

    def proxy_basis(self, layer_idx: int, keys: torch.Tensor | None = None, valid: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """A layer's proxy basis: ``(kv_heads, d, rank)`` calibrated, or ``(batch, kv_heads, d, rank)`` fit on ``keys``.

        ``keys`` are the first post-RoPE keys the layer sees, ``(batch, kv_heads, n, d)``, and ``valid``
        bool ``(batch, n)`` marks the real ones (padding is left out of the fit); ``lrqk`` only.
        """
        if not self.per_prompt:
            return self._bases[layer_idx]
        real = keys.float() * valid[:, None, :, None]
        gram = real.transpose(-1, -2) @ real  # (batch, kv_heads, d, d)
        _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
        return vectors[..., -self.rank:].flip(-1).to(keys.dtype).contiguous()

    def place(self, layer_idx: int, device: torch.device) -> None:
        """Move a layer's calibrated proxy basis to ``device``, where its keys arrive (``aqua``; ``lrqk`` has none)."""
        if self._bases:
            self._bases[layer_idx] = self._bases[layer_idx].to(device)

    def tensors(self) -> list[torch.Tensor]:
        """The calibrated proxy bases (none for ``lrqk``: fit per prompt, counted by the cache)."""
        return list(self._bases)

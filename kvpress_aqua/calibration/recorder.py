"""Recording what AQUA calibrates on: the post-RoPE queries and keys of every attention layer.

:class:`GramRecorder` accumulates, per layer and KV head, the float64 Gram matrices ``QᵀQ`` (the
queries of the head's GQA group) and ``KᵀK``; :func:`recording` runs a model with
:func:`capture_attention` (standard SDPA that first hands ``query`` and ``key`` to the active
recorder) through :func:`kvpress_aqua.attention.switch.switched`, which registers it and gives the
model its own implementation back afterwards, even on error.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..attention.switch import switched
from ..model_info import ModelInfo

__all__ = ["CAPTURE_ATTENTION", "GramRecorder", "capture_attention", "recording"]

CAPTURE_ATTENTION = "kvpress_aqua_calibration"
"""Name under which the recording attention function is registered (sdpa plus a record of q and k)."""


class GramRecorder:
    """Accumulates, per layer and KV head, the float64 Gram matrices of post-RoPE keys and queries.

    Parameters
    ----------
    info : ModelInfo
        The model's shape: the recorded tensors are checked against it.

    Attributes
    ----------
    keys, queries : dict of int to torch.Tensor
        Layer index -> ``(kv_heads, head_dim, head_dim)`` sums of ``kᵀk`` and of ``qᵀq`` over the
        group's queries.

    """

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.keys: dict[int, torch.Tensor] = {}
        self.queries: dict[int, torch.Tensor] = {}

    def add(self, layer_idx: int | None, query: torch.Tensor, key: torch.Tensor) -> None:
        """Add one attention call's ``query (batch, heads, seq, d)`` and ``key (batch, kv_heads, seq, d)``."""
        info = self.info
        if layer_idx is None:
            raise ValueError("calibration needs attention modules with a `layer_idx` attribute")
        batch, heads, seq, d = query.shape
        if heads != info.num_heads or key.shape[1] != info.num_kv_heads or d != info.head_dim:
            raise ValueError(
                f"layer {layer_idx} attention got query {tuple(query.shape)} and key {tuple(key.shape)}, but the "
                f"config says {info.num_heads} heads, {info.num_kv_heads} KV heads, head_dim {info.head_dim}"
            )
        q = query.detach().double().reshape(batch, info.num_kv_heads, info.group_size * seq, d)
        k = key.detach().double()
        gram_q = torch.einsum("bhti,bhtj->hij", q, q)
        gram_k = torch.einsum("bhti,bhtj->hij", k, k)
        if layer_idx in self.keys:
            self.queries[layer_idx] += gram_q
            self.keys[layer_idx] += gram_k
        else:
            self.queries[layer_idx], self.keys[layer_idx] = gram_q, gram_k


_ACTIVE = threading.local()


def capture_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Standard sdpa attention that first hands ``query`` and ``key`` (post-RoPE) to the active recorder."""
    recorder = getattr(_ACTIVE, "recorder", None)
    if recorder is not None:
        recorder.add(getattr(module, "layer_idx", None), query, key)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@contextmanager
def recording(model: Any, recorder: GramRecorder) -> Iterator[None]:
    """Run ``model`` with :func:`capture_attention` feeding ``recorder`` inside the block.

    The model's attention implementation is restored afterwards and the recorder deactivated, even on error.
    """
    _ACTIVE.recorder = recorder
    try:
        with switched(model, CAPTURE_ATTENTION, capture_attention):
            yield
    finally:
        _ACTIVE.recorder = None

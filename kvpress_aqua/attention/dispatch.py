"""The ``AttentionInterface`` entry: attention over the inputs a compressed layer just handed off.

``CompressedLayer.update`` stores the new tokens and leaves an
:class:`~kvpress_aqua.ops.inputs.AttentionInputs` for the attention call that follows in the same
layer: every tensor that call needs and nothing that refers back to the layer.
:func:`compressed_attention` takes it, runs the attention op for the device (the fused Triton
kernel on CUDA where it applies, else :func:`~kvpress_aqua.ops.reference.reference_attention`) and
writes the results (the attention mass each slot received, which new tokens are padding) into the
same object, where the layer folds them in at its next update. Nothing here imports or calls the
cache.

A call not preceded by an update of a compressed layer (the model run without our cache) runs
``transformers``' SDPA attention, the same math as eager attention, with the mask SDPA's mask
function built.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..ops import reference, retrieval
from ..ops.inputs import AttentionInputs

__all__ = ["ATTENTION_NAME", "compressed_attention", "hand_off"]

ATTENTION_NAME = "kvpress_aqua"

BACKEND = os.environ.get("KVPRESS_AQUA_ATTENTION", "auto")
"""``auto``: the fused Triton kernel on CUDA where it applies, else the reference; ``reference``: always
the reference; ``triton``: the kernel wherever it applies, CPU tensors included (Triton's interpreter,
for tests). Set it, or the ``KVPRESS_AQUA_ATTENTION`` environment variable, to compare them."""


@functools.cache
def _fused_kernel() -> Callable[..., Any] | None:
    """The fused kernel, or ``None`` where Triton is not installed (imported on the first CUDA call only)."""
    try:
        from ..ops.triton_attention import triton_attention
    except ImportError:
        return None
    return triton_attention

_pending = threading.local()


def _attend(inputs: AttentionInputs, query: torch.Tensor, new_mask: torch.Tensor, scale: float,
            softcap: float | None, with_lse: bool = False) -> tuple[torch.Tensor, ...]:
    """The attention op for the device: the fused kernel where it applies, else the reference.

    Either way a static decode step's mass ends up folded into ``inputs.score_out`` (the kernel
    folds it itself; after the reference it is folded here).
    """
    result = None
    wanted = BACKEND == "triton" or (BACKEND == "auto" and query.is_cuda)
    if wanted and (kernel := _fused_kernel()) is not None:
        result = kernel(inputs, query, new_mask, scale, softcap, with_lse)
    if result is None:
        result = reference.reference_attention(inputs, query, new_mask, scale, softcap, with_lse)
        if inputs.score_out is not None:
            reference.fold_scores(inputs.score_out, inputs.score_decay, result[1], result[2], inputs.new_slots)
    return result


def hand_off(inputs: AttentionInputs) -> None:
    """Leave ``inputs`` for the next attention call of layer ``inputs.layer_idx``."""
    _pending.value = inputs


def _take(layer_idx: int | None) -> AttentionInputs | None:
    inputs = getattr(_pending, "value", None)
    if inputs is None or inputs.layer_idx != layer_idx:
        return None
    _pending.value = None
    return inputs


def compressed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` entry: attention over the inputs the layer just handed off.

    Parameters
    ----------
    module : torch.nn.Module
        The model's attention module (``module.layer_idx`` identifies the layer).
    query : torch.Tensor
        Post-RoPE queries ``(batch, heads, new, head_dim)``.
    key, value : torch.Tensor
        What the cache's ``update`` returned (used only by the fallback path).
    attention_mask : torch.Tensor or None
        The chunk's ``(batch, 1, new, new)`` mask (boolean or additive float), or ``None`` for causal.
    scaling : float, optional
        Score scale; defaults to ``1/sqrt(head_dim)``.
    dropout : float
        Ignored (inference only).
    softcap : float, optional
        Gemma-2 style logit soft-capping.
    sliding_window : int, optional
        Unused: the layer hands off its model window.
    **kwargs
        Passed to the fallback.

    Returns
    -------
    tuple
        ``(output (batch, new, heads, head_dim), None)``.

    """
    inputs = _take(getattr(module, "layer_idx", None))
    if inputs is None:  # no compressed layer in this call: standard attention (the mask is SDPA's)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      softcap=softcap, sliding_window=sliding_window, **kwargs)
    n = query.shape[-2]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    new_mask = reference.new_block_mask(attention_mask, n, query.device)
    held = inputs.past_keys.shape[-2]
    tier = inputs.retrieval
    if tier is not None and n > 1 and retrieval.streams(inputs):
        # an offloaded retrieval tier's chunk: held slots and the chunk, then the earlier rows block by block
        result = retrieval.chunk_attention(inputs, query, new_mask, scale, softcap,
                                           functools.partial(_attend, with_lse=True))
    else:  # a retrieval layer: its held slots plus the rows retrieved from its tier, as plain inputs
        attended = inputs if tier is None else retrieval.retrieve(inputs, query, scale)
        result = _attend(attended, query, new_mask, scale, softcap)
    out, mass_past, inputs.mass_new = result
    inputs.mass_past = mass_past[..., :held]
    inputs.new_valid = new_mask.diagonal(dim1=-2, dim2=-1).reshape(-1, n).expand(query.shape[0], n)
    return out.transpose(1, 2).contiguous(), None

"""The one attention function that reads a compressed layer's stored form.

``CompressedLayer.update`` stores the new tokens and leaves a :class:`Handoff` for the attention
call that follows in the same layer; :func:`compressed_attention` takes it and computes attention
over two blocks:

- the *past* block: every held slot except the ones just written, masked by the layer's own
  per-slot validity (padding, empty slots) and, on the model's sliding-window layers, by the window;
  keys are in their stored form (rotated and pruned under AQUA) and queries are projected the same way;
  the few tokens whose dropped channels the layer also keeps (``exact_sinks``, ``exact_recent``) get
  the dropped channels' share of the score added back, so attention to them is exact;
- the *new* block: the chunk's own tokens with raw queries and keys (full precision), masked by the causal/padding mask
  ``transformers`` built for the chunk (``get_mask_sizes`` announces just the chunk).

Keys are never expanded across a GQA group: queries are regrouped per KV head instead. A call that
was not preceded by an update of a compressed layer (the model run without our cache) falls back
to ``transformers``' SDPA attention.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

if TYPE_CHECKING:
    from .cache import CompressedLayer

__all__ = ["ATTENTION_NAME", "Handoff", "compressed_attention", "register"]

ATTENTION_NAME = "kvpress_aqua"


@dataclass
class Handoff:
    """What a layer's ``update`` passes to the attention call that follows.

    Attributes
    ----------
    layer : CompressedLayer
        The layer just updated (its tensors already hold the new tokens).
    keys_new : torch.Tensor
        The chunk's post-RoPE keys as the model made them, ``(batch, kv_heads, new, head_dim)``.
    values_new : torch.Tensor
        The chunk's values, ``(batch, kv_heads, new, head_dim)``.
    new_slots : torch.Tensor
        int64 ``(batch, kv_heads, new)``: the slots the chunk was written to.

    """

    layer: CompressedLayer
    keys_new: torch.Tensor
    values_new: torch.Tensor
    new_slots: torch.Tensor


_pending = threading.local()


def hand_off(handoff: Handoff) -> None:
    """Leave ``handoff`` for the next attention call of ``handoff.layer``'s layer index."""
    _pending.value = handoff


def _take(layer_idx: int | None) -> Handoff | None:
    handoff = getattr(_pending, "value", None)
    if handoff is None or handoff.layer.layer_idx != layer_idx:
        return None
    _pending.value = None
    return handoff


def register() -> None:
    """Register the attention function and its mask function with ``transformers`` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, compressed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def _new_block_mask(attention_mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """Boolean ``(batch or 1, 1, 1, n, n)`` mask of the chunk attending to itself."""
    if attention_mask is None:
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        return causal[None, None, None]
    block = attention_mask[..., -n:]
    if block.dtype != torch.bool:  # additive float mask: 0 where attended
        block = block == 0
    return block[:, :, None]


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
    """Attention over a compressed layer's held slots plus the current chunk.

    Parameters
    ----------
    module : torch.nn.Module
        The model's attention module (``module.layer_idx`` identifies the layer).
    query : torch.Tensor
        Post-RoPE queries ``(batch, heads, new, head_dim)``.
    key, value : torch.Tensor
        What the cache's ``update`` returned (used only by the fallback path).
    attention_mask : torch.Tensor or None
        The chunk's boolean ``(batch, 1, new, new)`` mask, or ``None`` for plain causal.
    scaling : float, optional
        Score scale; defaults to ``1/sqrt(head_dim)``.
    dropout : float
        Ignored (inference only).
    softcap : float, optional
        Gemma-2 style logit soft-capping.
    sliding_window : int, optional
        Unused: the layer knows its model window.
    **kwargs
        Passed to the fallback.

    Returns
    -------
    tuple
        ``(output (batch, new, heads, head_dim), None)``.

    """
    handoff = _take(getattr(module, "layer_idx", None))
    if handoff is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
            softcap=softcap, sliding_window=sliding_window, **kwargs,
        )
    layer = handoff.layer
    batch, heads, n, head_dim = query.shape
    kv_heads = layer.num_kv_heads
    group = heads // kv_heads
    scale = head_dim**-0.5 if scaling is None else scaling

    q_past = layer.channel.project_queries(layer.layer_idx, query) if layer.channel else query
    q_past = q_past.reshape(batch, kv_heads, group * n, q_past.shape[-1])
    q_new = query.reshape(batch, kv_heads, group * n, head_dim)

    slots = layer.keys.shape[-2]
    scores_past = (q_past @ layer.keys.transpose(-1, -2)).float().mul_(scale).view(batch, kv_heads, group, n, slots)
    scores_new = (q_new @ handoff.keys_new.transpose(-1, -2)).float().mul_(scale).view(batch, kv_heads, group, n, n)
    if layer.residual is not None:
        _add_exact(layer, query, scores_past, scale)
    if softcap is not None:
        scores_past = torch.tanh(scores_past / softcap) * softcap
        scores_new = torch.tanh(scores_new / softcap) * softcap

    past_mask = layer.past_mask(handoff.new_slots, n)  # (batch, kv_heads, 1, 1 or n, slots)
    new_mask = _new_block_mask(attention_mask, n, query.device)  # (batch or 1, 1, 1, n, n)
    lowest = torch.finfo(torch.float32).min
    scores = torch.cat(
        [scores_past.masked_fill(~past_mask, lowest), scores_new.masked_fill(~new_mask, lowest)], dim=-1
    )
    weights = scores.softmax(dim=-1)
    # A query that can see nothing (a left-padding token) gets a zero output and gives no score.
    sees_something = past_mask.any(-1, keepdim=True) | new_mask.any(-1, keepdim=True)
    weights = weights * sees_something
    w_past, w_new = weights.split([slots, n], dim=-1)

    dtype = layer.values.dtype
    out = w_past.to(dtype).reshape(batch, kv_heads, group * n, slots) @ layer.values
    out = out + w_new.to(dtype).reshape(batch, kv_heads, group * n, n) @ handoff.values_new
    out = out.view(batch, kv_heads, group, n, -1).reshape(batch, heads, n, -1)

    new_valid = new_mask.diagonal(dim1=-2, dim2=-1).reshape(-1, n).expand(batch, n)
    layer.after_attention(handoff, new_valid, w_past.sum((2, 3)), w_new.sum((2, 3)))
    return out.transpose(1, 2).contiguous(), None


def _add_exact(layer: CompressedLayer, query: torch.Tensor, scores_past: torch.Tensor, scale: float) -> None:
    """Add the dropped channels' share of the score to the slots whose residual keys the layer holds.

    ``scores_past`` is ``(batch, kv_heads, group, n, slots)``, changed in place; only the
    ``exact_sinks + exact_recent`` residual rows are multiplied, never the whole past.
    """
    batch, kv_heads, group, n, _ = scores_past.shape
    q_res = layer.channel.residual_queries(layer.layer_idx, query).reshape(batch, kv_heads, group * n, -1)
    extra = (q_res @ layer.residual.transpose(-1, -2)).float().mul_(scale).view(batch, kv_heads, group, n, -1)
    # rows that stand for no held past token are zero, so they add nothing wherever they point
    scores_past.scatter_add_(-1, layer.exact_slot[:, :, None, None, :].expand_as(extra), extra)

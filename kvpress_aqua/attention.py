"""The attention over a compressed layer: plain tensors in, ``(output, per-slot mass)`` out.

``CompressedLayer.update`` stores the new tokens and leaves an :class:`AttentionInputs` for the
attention call that follows in the same layer: every tensor that call needs (the past as stored,
its visibility, the chunk's raw keys and values, AQUA's bases and exact-token rows) and nothing that
refers back to the layer. :func:`compressed_attention`, registered with ``transformers``'
``AttentionInterface``, takes it, runs :func:`reference_attention` and writes the results (the
attention mass each slot received, which new tokens are padding) into the same object, where the
layer folds them in at its next update. Nothing here imports or calls the cache.

:func:`reference_attention` computes attention over two blocks:

- the *past* block: the held slots before the chunk, masked by per-slot visibility (padding, empty
  and just-overwritten slots) and, on the model's sliding-window layers, by the window; keys are in
  their stored form (rotated and pruned under AQUA) and queries are projected the same way; the few
  tokens whose dropped channels the layer also keeps (AQUA's exact tokens) get the dropped
  channels' share of the score added back, so attention to them is exact;
- the *new* block: the chunk's own tokens with raw queries and keys (full precision), masked by the
  causal/padding mask ``transformers`` built for the chunk.

It runs blockwise over query rows, so its float32 working set is bounded by
:data:`BLOCK_SCORE_BYTES` whatever the chunk length, and never expands keys across a GQA group.
A call not preceded by an update of a compressed layer (the model run without our cache) runs
``transformers``' SDPA attention, the same math as eager attention, with the mask SDPA's mask
function built.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

__all__ = [
    "ATTENTION_NAME",
    "BLOCK_SCORE_BYTES",
    "AttentionInputs",
    "acquire",
    "compressed_attention",
    "hand_off",
    "reference_attention",
    "release",
]

ATTENTION_NAME = "kvpress_aqua"

BLOCK_SCORE_BYTES = 8 * 2**20
"""Bytes of float32 scores one block of query rows may hold (past and new block together).

The reference attention keeps about two such tensors alive at once (scores and their exponentials
are computed in place), so a layer's attention working set stays near ``2 x BLOCK_SCORE_BYTES``
however long the chunk is (a single query row may need more)."""


@dataclass
class AttentionInputs:
    """Everything one attention call over a compressed layer reads, and the results it writes back.

    Shapes: ``B`` sequences, ``H_kv`` KV heads, ``S`` past slots, ``n`` new tokens, ``d`` head
    width, ``r`` stored key channels, ``E`` exact-token rows.

    Attributes
    ----------
    layer_idx : int
        The decoder layer (the attention call of another layer never takes these inputs).
    past_keys, past_values : torch.Tensor
        ``(B, H_kv, S, r)`` stored keys and ``(B, H_kv, S, d_v)`` values of the slots before the chunk.
    past_visible : torch.Tensor
        bool ``(B, H_kv, S)``: which past slots the chunk may attend (valid and not just overwritten).
    keys_new, values_new : torch.Tensor
        ``(B, H_kv, n, d)``: the chunk's post-RoPE keys and its values as the model made them.
    past_index : torch.Tensor or None
        int32 ``(B, H_kv, S)`` cache index of each past slot; only on the model's sliding-window layers.
    window : int or None
        The model's own window on this layer (a query at index ``t`` sees indices ``> t - window``).
    first_index : int
        Cache index of the chunk's first token.
    key_basis : torch.Tensor or None
        ``(H_kv, d, r)``: queries are projected by it before they meet stored keys; ``None``: keys
        are stored as they come.
    query_channels : int or None
        Channels of each projected query kept by magnitude (AQUA's compute mode); ``None`` keeps all.
    residual, residual_basis, exact_slot : torch.Tensor or None
        AQUA's exact tokens: their dropped key channels ``(B, H_kv, E, d - r)``, the basis of those
        channels ``(H_kv, d, d - r)`` and the past slot of each row, int64 ``(B, H_kv, E)``. A row that
        stands for no past token is zero.
    want_mass : bool
        Whether the attention mass per slot is needed (score-based token policies).
    mass_past, mass_new : torch.Tensor or None
        Written by the attention: float32 ``(B, H_kv, S)`` and ``(B, H_kv, n)``, the attention weight
        each past slot and each new token received, summed over the chunk's queries and over the
        query heads of each KV group (zeros when ``want_mass`` is False).
    new_valid : torch.Tensor or None
        Written by the attention: bool ``(B, n)``, False for new tokens that are padding.

    """

    layer_idx: int
    past_keys: torch.Tensor
    past_values: torch.Tensor
    past_visible: torch.Tensor
    keys_new: torch.Tensor
    values_new: torch.Tensor
    past_index: torch.Tensor | None = None
    window: int | None = None
    first_index: int = 0
    key_basis: torch.Tensor | None = None
    query_channels: int | None = None
    residual: torch.Tensor | None = None
    residual_basis: torch.Tensor | None = None
    exact_slot: torch.Tensor | None = None
    want_mass: bool = False
    mass_past: torch.Tensor | None = None
    mass_new: torch.Tensor | None = None
    new_valid: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        """Whether an attention call has written its results."""
        return self.new_valid is not None


# ----------------------------------------------------------------------------- the reference math
def _per_group(query: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``(B, H_kv, G, n, d) @ (H_kv, d, w)``: each query head uses its KV head's basis."""
    return query @ basis[:, None]


def _top_channels(query: torch.Tensor, keep: int | None) -> torch.Tensor:
    """Zero all but the ``keep`` largest-magnitude channels of each query (no-op for ``None``)."""
    if keep is None or keep >= query.shape[-1]:
        return query
    top = query.abs().topk(keep, dim=-1).indices
    return torch.zeros_like(query).scatter_(-1, top, query.gather(-1, top))


def _new_block_mask(attention_mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """Boolean ``(B or 1, 1, n, n)`` mask of the chunk attending to itself."""
    if attention_mask is None:
        return torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]
    block = attention_mask[..., -n:]
    if block.dtype != torch.bool:  # additive float mask: 0 where attended
        block = block == 0
    return block[..., -n:, :]


def _rows_per_block(batch: int, heads: int, columns: int, n: int) -> int:
    return max(1, min(n, BLOCK_SCORE_BYTES // max(1, 4 * batch * heads * columns)))


def reference_attention(
    inputs: AttentionInputs,
    query: torch.Tensor,
    new_mask: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of a chunk's queries over a compressed layer's past and the chunk itself.

    Parameters
    ----------
    inputs : AttentionInputs
        The layer's prepared tensors.
    query : torch.Tensor
        Post-RoPE queries ``(B, H, n, d)``, ``H`` a multiple of ``H_kv``.
    new_mask : torch.Tensor
        bool ``(B or 1, 1, n, n)``: which chunk tokens each query sees (causal and padding).
    scale : float
        Score scale (``1/sqrt(d)`` usually).
    softcap : float, optional
        Gemma-2 style logit soft-capping.

    Returns
    -------
    tuple of torch.Tensor
        ``output (B, H, n, d_v)`` in the values' dtype; ``mass_past (B, H_kv, S)`` and
        ``mass_new (B, H_kv, n)``, float32 (zeros unless ``inputs.want_mass``). A query that sees
        nothing (a left-padding token) gets a zero output and gives no mass.

    """
    batch, heads, n, d = query.shape
    kv_heads = inputs.keys_new.shape[1]
    group = heads // kv_heads
    slots = inputs.past_keys.shape[-2]
    dtype = inputs.values_new.dtype
    grouped = query.view(batch, kv_heads, group, n, d)
    q_past = q_res = None
    if slots:
        q_past = grouped if inputs.key_basis is None else _per_group(grouped, inputs.key_basis)
        q_past = _top_channels(q_past, inputs.query_channels)
        if inputs.residual is not None:
            q_res = _per_group(grouped, inputs.residual_basis)
    # a causal chunk (every model this package supports) lets row block [lo, hi) skip new keys >= hi
    causal = not bool(torch.triu(new_mask, 1).any()) if n > 1 else True
    out = query.new_empty(batch, kv_heads, group, n, inputs.values_new.shape[-1], dtype=dtype)
    mass_past = torch.zeros(batch, kv_heads, slots, dtype=torch.float32, device=query.device)
    mass_new = torch.zeros(batch, kv_heads, n, dtype=torch.float32, device=query.device)
    rows = _rows_per_block(batch, heads, slots + n, n)
    lowest = torch.finfo(torch.float32).min
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        cols = hi if causal else n
        r = hi - lo

        def flat(x: torch.Tensor, r: int = r) -> torch.Tensor:
            return x.reshape(batch, kv_heads, group * r, x.shape[-1])

        def scores(q: torch.Tensor, keys: torch.Tensor, r: int = r) -> torch.Tensor:
            s = (flat(q) @ keys.transpose(-1, -2)).float().mul_(scale)
            return s.view(batch, kv_heads, group, r, -1)

        s_new = scores(grouped[:, :, :, lo:hi], inputs.keys_new[:, :, :cols])
        seen_new = new_mask[..., lo:hi, :cols][:, :, None]  # (B or 1, 1, 1, r, cols)
        if softcap is not None:
            s_new = torch.tanh(s_new / softcap).mul_(softcap)
        s_new.masked_fill_(~seen_new, lowest)
        top = s_new.amax(-1, keepdim=True)
        sees = seen_new.any(-1, keepdim=True)
        if slots:
            s_past = scores(q_past[:, :, :, lo:hi], inputs.past_keys)
            if q_res is not None:
                extra = scores(q_res[:, :, :, lo:hi], inputs.residual)
                index = inputs.exact_slot[:, :, None, None, :].expand_as(extra)
                s_past.scatter_add_(-1, index, extra)  # rows for no past token are zero
            if softcap is not None:
                s_past = torch.tanh(s_past / softcap).mul_(softcap)
            seen_past = _past_visibility(inputs, lo, hi)
            s_past.masked_fill_(~seen_past, lowest)
            top = torch.maximum(top, s_past.amax(-1, keepdim=True))
            sees = sees | seen_past.any(-1, keepdim=True)
            s_past.sub_(top).exp_()
        s_new.sub_(top).exp_()
        total = s_new.sum(-1, keepdim=True)
        if slots:
            total += s_past.sum(-1, keepdim=True)
        norm = sees / total  # 0 for a query that sees nothing
        s_new.mul_(norm)
        o = flat(s_new.to(dtype)) @ inputs.values_new[:, :, :cols]
        if inputs.want_mass:
            mass_new[..., :cols] += s_new.sum((2, 3))
        if slots:
            s_past.mul_(norm)
            o += flat(s_past.to(dtype)) @ inputs.past_values
            if inputs.want_mass:
                mass_past += s_past.sum((2, 3))
        out[:, :, :, lo:hi] = o.view(batch, kv_heads, group, r, -1)
    return out.view(batch, heads, n, -1), mass_past, mass_new


def _past_visibility(inputs: AttentionInputs, lo: int, hi: int) -> torch.Tensor:
    """Past slots seen, bool ``(B, H_kv, 1, 1 or rows, S)``: the past slots queries ``lo..hi-1`` of the chunk see."""
    visible = inputs.past_visible[:, :, None, None, :]
    if inputs.window is None:
        return visible
    query_index = torch.arange(inputs.first_index + lo, inputs.first_index + hi, device=visible.device)
    lowest = (query_index - inputs.window)[:, None]  # (rows, 1)
    return visible & (inputs.past_index[:, :, None, None, :] > lowest)


# ------------------------------------------------------------------- the hand-off and the interface
_pending = threading.local()


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
    new_mask = _new_block_mask(attention_mask, n, query.device)
    out, inputs.mass_past, inputs.mass_new = reference_attention(inputs, query, new_mask, scale, softcap)
    inputs.new_valid = new_mask.diagonal(dim1=-2, dim2=-1).reshape(-1, n).expand(query.shape[0], n)
    return out.transpose(1, 2).contiguous(), None


# ------------------------------------------------------------------ switching a model's attention
_ORIGINAL: dict[int, str] = {}
"""``id(model.config)`` -> the attention implementation the model had before the first live cache switched it."""
_HOLDERS: dict[int, set[int]] = {}
"""``id(model.config)`` -> tokens of the live caches that need the switch."""


def _set_attention(model: Any, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def acquire(model: Any, token: int) -> None:
    """Switch ``model`` to :func:`compressed_attention` on behalf of the cache ``token`` (idempotent)."""
    key = id(model.config)
    if key not in _HOLDERS:
        AttentionInterface.register(ATTENTION_NAME, compressed_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
        original = model.config._attn_implementation
        _ORIGINAL[key] = "sdpa" if original in (None, ATTENTION_NAME) else original
        _HOLDERS[key] = set()
    if model.config._attn_implementation != ATTENTION_NAME:
        _set_attention(model, ATTENTION_NAME)
    _HOLDERS[key].add(token)


def release(model: Any, token: int) -> None:
    """Drop the cache ``token``'s need; the last one gives ``model`` its original attention back."""
    key = id(model.config)
    holders = _HOLDERS.get(key)
    if holders is None or token not in holders:
        return
    holders.discard(token)
    if holders:
        return
    del _HOLDERS[key]
    original = _ORIGINAL.pop(key)
    if model.config._attn_implementation == ATTENTION_NAME:
        _set_attention(model, original)


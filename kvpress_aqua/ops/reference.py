"""The reference attention over a compressed layer: plain PyTorch, the oracle every kernel is tested against.

:func:`reference_attention` computes attention over two blocks:

- the *past* block: the held slots before the chunk, masked by per-slot visibility (padding, empty
  and just-overwritten slots) and, on the model's sliding-window layers, by the window; keys are in
  their stored form (rotated and pruned under AQUA) and queries are projected the same way; the few
  tokens whose dropped channels the layer also keeps (AQUA's exact tokens) get the dropped
  channels' share of the score added back, so attention to them is exact;
- the *new* block: the chunk's own tokens with raw queries and keys (full precision), masked by the
  causal/padding mask ``transformers`` built for the chunk.

It runs blockwise over query rows, so its float32 working set is bounded by
:data:`~kvpress_aqua.ops.limits.BLOCK_SCORE_BYTES` whatever the chunk length, and never expands keys across a GQA group.
"""

from __future__ import annotations

import torch

from . import limits
from .inputs import AttentionInputs

__all__ = ["fold_scores", "new_block_mask", "reference_attention", "top_channels"]




def _per_group(query: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``(B, H_kv, G, n, d) @ (H_kv, d, w)``: each query head uses its KV head's basis."""
    return query @ basis[:, None]


def top_channels(query: torch.Tensor, keep: int | None) -> torch.Tensor:
    """Zero all but the ``keep`` largest-magnitude channels of each query (no-op for ``None``)."""
    if keep is None or keep >= query.shape[-1]:
        return query
    top = query.abs().topk(keep, dim=-1).indices
    return torch.zeros_like(query).scatter_(-1, top, query.gather(-1, top))


def new_block_mask(attention_mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """Boolean ``(B or 1, 1, n, n)`` mask of the chunk attending to itself."""
    if attention_mask is None:
        return torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]
    block = attention_mask[..., -n:]
    if block.dtype != torch.bool:  # additive float mask: 0 where attended
        block = block == 0
    return block[..., -n:, :]


def _row_sum(weights: torch.Tensor, giving: torch.Tensor | None) -> torch.Tensor:
    """Mass per key ``(B, H_kv, keys)`` from weights ``(B, H_kv, G, r, keys)``, rows ``giving`` ``(r, 1)`` only."""
    return (weights if giving is None else weights * giving).sum((2, 3))


def _rows_per_block(batch: int, heads: int, columns: int, n: int) -> int:
    return max(1, min(n, limits.BLOCK_SCORE_BYTES // max(1, 4 * batch * heads * columns)))


def reference_attention(
    inputs: AttentionInputs,
    query: torch.Tensor,
    new_mask: torch.Tensor,
    scale: float,
    softcap: float | None = None,
    with_lse: bool = False,
) -> tuple[torch.Tensor, ...]:
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
    with_lse : bool
        Also return each query's float32 log-sum-exp of its scores ``(B, H, n)`` (natural log,
        ``-inf`` for a query that sees nothing), so that attention over other keys can be merged.

    Returns
    -------
    tuple of torch.Tensor
        ``output (B, H, n, d_v)`` in the values' dtype; ``mass_past (B, H_kv, S)`` and
        ``mass_new (B, H_kv, n)``, float32 (zeros unless ``inputs.want_mass``); the log-sum-exp
        with ``with_lse``. A query that sees nothing (a left-padding token) gets a zero output and
        gives no mass.

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
        q_past = top_channels(q_past, inputs.query_channels)
        if inputs.exact_keys is not None:
            q_res = _per_group(grouped, inputs.exact_basis)
    # a causal chunk (every model this package supports) lets row block [lo, hi) skip new keys >= hi
    causal = not bool(torch.triu(new_mask, 1).any()) if n > 1 else True
    out = query.new_empty(batch, kv_heads, group, n, inputs.values_new.shape[-1], dtype=dtype)
    mass_past = torch.zeros(batch, kv_heads, slots, dtype=torch.float32, device=query.device)
    mass_new = torch.zeros(batch, kv_heads, n, dtype=torch.float32, device=query.device)
    lse = torch.empty(batch, kv_heads, group, n, dtype=torch.float32, device=query.device) if with_lse else None
    rows = _rows_per_block(batch, heads, slots + n, n)
    mass_from = n - inputs.mass_rows if inputs.mass_rows is not None else 0  # first query row giving mass
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
                extra = scores(q_res[:, :, :, lo:hi], inputs.exact_keys)
                index = inputs.exact_slot.clamp_min(0)[:, :, None, None, :].expand_as(extra)
                s_past.scatter_add_(-1, index, extra)  # rows for no past token are zero
            if softcap is not None:
                s_past = torch.tanh(s_past / softcap).mul_(softcap)
            if inputs.past_log_weight is not None:  # a summary slot stands for exp(log_weight) tokens
                s_past += inputs.past_log_weight[:, :, None, None, :]
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
        if lse is not None:
            lse[:, :, :, lo:hi] = (top + total.log()).masked_fill(~sees, float("-inf"))[..., 0]
        s_new.mul_(norm)
        o = flat(s_new.to(dtype)) @ inputs.values_new[:, :, :cols]
        giving = None if mass_from <= lo else (torch.arange(lo, hi, device=query.device) >= mass_from)[:, None]
        if inputs.want_mass:
            mass_new[..., :cols] += _row_sum(s_new, giving)
        if slots:
            s_past.mul_(norm)
            o += flat(s_past.to(dtype)) @ inputs.past_values
            if inputs.want_mass:
                mass_past += _row_sum(s_past, giving)
        out[:, :, :, lo:hi] = o.view(batch, kv_heads, group, r, -1)
    if lse is not None:
        return out.view(batch, heads, n, -1), mass_past, mass_new, lse.view(batch, heads, n)
    return out.view(batch, heads, n, -1), mass_past, mass_new


def _past_visibility(inputs: AttentionInputs, lo: int, hi: int) -> torch.Tensor:
    """Past slots seen, bool ``(B, H_kv, 1, 1 or rows, S)``: the past slots queries ``lo..hi-1`` of the chunk see."""
    visible = inputs.past_visible[:, :, None, None, :]
    if inputs.window is None:
        return visible
    query_index = inputs.first_index + torch.arange(lo, hi, device=visible.device)
    lowest = (query_index - inputs.window)[:, None]  # (rows, 1)
    return visible & (inputs.past_index[:, :, None, None, :] > lowest)


def fold_scores(score: torch.Tensor, decay: float, mass_past: torch.Tensor, mass_new: torch.Tensor,
                new_slots: torch.Tensor) -> None:
    """Fold one call's attention mass into a layer's score buffer ``(B, H_kv, S)``, in place.

    ``score = score * decay + mass_past`` on the slots both cover (the first ones), then
    ``mass_new (B, H_kv, n)`` added at the new tokens' slots ``new_slots`` (int64, same shape).
    """
    if decay != 1.0:
        score.mul_(decay)
    held = min(score.shape[-1], mass_past.shape[-1])
    score[..., :held] += mass_past[..., :held]
    score.scatter_add_(2, new_slots, mass_new)

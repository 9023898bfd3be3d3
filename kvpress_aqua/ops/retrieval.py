"""Query-time retrieval from a second tier: proxy scores, top-k, hit/miss against the working set, gather.

A retrieval layer holds every token in a tier (host memory when offloaded) and, on the
accelerator, a few held slots (sinks and the most recent tokens), a low-rank *proxy* key of every
token and a *working set*: the rows the last decode step retrieved. :func:`retrieve` turns such a
layer's :class:`~kvpress_aqua.ops.inputs.AttentionInputs` into plain ones whose past block is the
held slots followed by the retrieved rows, so that any attention op (the reference, the fused
kernel) attends exactly over that set:

- a decode step (one query per sequence) scores every earlier token that is not held with the
  proxy: each query head's proxy logits ``scale * (q @ basis) · proxy_key``, normalized by their
  log-sum-exp, pooled over the KV group by the maximum (a token that one query head needs is
  kept for the group; :func:`proxy_scores`), takes the ``top_k`` per
  sequence and KV head, finds which of them the working set already holds (a sorted search) and
  copies only the others from the tier;
- a chunk of several queries (a prefill chunk, a question) attends to every earlier token (exact
  prefill, as in LRQK, Quest and ShadowKV, which all prefill densely). With the tier on the
  accelerator its earlier rows join the past block for that call; an offloaded tier
  (:func:`streams`) goes through :func:`chunk_attention`, which runs the attention op over the
  held slots and the chunk, then over the earlier rows a block at a time (each block copied to the
  accelerator for its call), and merges the calls by their log-sum-exp, so the accelerator holds
  one block of the earlier rows, never all of them;
- a static decode step (the cache index a 0-d tensor, the tier allocated for every step) makes
  the same choice over the tier's whole capacity with tokens from the step's index on masked
  out, and reads the chosen rows straight from the tier (no working set, no host
  synchronization): a fixed sequence of device operations, which a CUDA graph replays.

Shapes: ``B`` sequences, ``H_kv`` KV heads, ``G`` query heads per KV head, ``T`` tokens seen, ``p``
proxy channels, ``k`` = ``top_k``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from . import limits
from .inputs import AttentionInputs, RetrievalInputs

__all__ = ["candidates", "chunk_attention", "proxy_scores", "retrieve", "select"]


def proxy_scores(query: torch.Tensor, basis: torch.Tensor, proxy_keys: torch.Tensor, valid: torch.Tensor,
                 scale: float, proxy_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Proxy score of every token for each KV head, float32 ``(B, H_kv, T)``.

    Each query head's proxy logits ``scale * (q @ basis) · proxy_key`` are normalized by their
    log-sum-exp over the valid tokens (padding left out): an estimate of the log attention weight,
    comparable across heads. The KV head takes the maximum over its group's query heads, so a
    token that one head needs is kept.

    Parameters
    ----------
    query : torch.Tensor
        Post-RoPE queries ``(B, H, n, d)``.
    basis : torch.Tensor
        ``(H_kv, d, p)`` or ``(B, H_kv, d, p)``.
    proxy_keys : torch.Tensor
        ``(B, H_kv, T, p)``.
    valid : torch.Tensor
        bool ``(B, H_kv, T)``: False for padding.
    scale : float
        The attention's score scale.
    proxy_scale : torch.Tensor, optional
        float32 ``(B, H_kv, T)``: the scales of int8 ``proxy_keys``.

    """
    batch, heads, n, d = query.shape
    kv_heads = proxy_keys.shape[1]
    grouped = query.view(batch, kv_heads, heads // kv_heads * n, d)
    projected = grouped @ (basis if basis.ndim == 4 else basis[None])
    if proxy_scale is None:
        logits = (projected @ proxy_keys.transpose(-1, -2)).float().mul_(scale)
    else:
        logits = (projected.float() @ proxy_keys.float().transpose(-1, -2)).mul_(proxy_scale[:, :, None] * scale)
    return logits.masked_fill_(~valid[:, :, None], float("-inf")).log_softmax(-1).amax(2)


def candidates(retrieval: RetrievalInputs, first_index: int | torch.Tensor, window: int | None) -> torch.Tensor:
    """Tokens a query at cache index ``first_index`` may retrieve: valid, earlier, not held, in the window.

    Returns bool ``(B, H_kv, T)``, ``T`` = ``first_index`` (an int) or the tier's rows (a 0-d tensor: a
    static step, tokens from ``first_index`` on are not allowed).
    """
    static = isinstance(first_index, torch.Tensor)
    length = retrieval.tier_valid.shape[-1] if static else first_index
    valid = retrieval.tier_valid[..., :length]
    batch, heads, _ = valid.shape
    held = retrieval.held_index.long()
    held = held.where((held >= 0) & (held < first_index), length)
    mask = valid.new_zeros(batch, heads, length + 1).scatter_(2, held, True)[..., :length]
    allowed = valid & ~mask
    positions = torch.arange(length, device=valid.device)
    if static:
        allowed &= positions < first_index
    if window is not None:
        allowed &= positions > first_index - window
    return allowed


def select(scores: torch.Tensor, allowed: torch.Tensor, top_k: int) -> torch.Tensor:
    """The ``top_k`` allowed tokens by score per row, ascending, -1 where fewer are allowed: int64 ``(B, H_kv, k)``.

    ``k`` is ``min(top_k, T)``.
    """
    k = min(top_k, scores.shape[-1])
    best = scores.masked_fill(~allowed, float("-inf")).topk(k, dim=-1)
    chosen = best.indices.where(best.values > float("-inf"), -1)
    return chosen.sort(dim=-1).values


def _gather_rows(retrieval: RetrievalInputs, selected: torch.Tensor, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The selected rows on ``device``: from the working set where it has them, else read from the tier.

    A tier with mapped views (:attr:`RetrievalInputs.mapped_keys`) is read by the device itself;
    otherwise the misses are gathered on the tier's device and copied.
    """
    tier_k, tier_v = retrieval.tier_keys, retrieval.tier_values
    batch, heads, k = selected.shape
    old = retrieval.ws_index
    if old is not None and old.shape[-1]:
        pos = torch.searchsorted(old, selected).clamp_max(old.shape[-1] - 1)
        hit = (old.gather(2, pos) == selected) & (selected >= 0)
        keys = retrieval.ws_keys.gather(2, pos[..., None].expand(-1, -1, -1, tier_k.shape[-1]))
        values = retrieval.ws_values.gather(2, pos[..., None].expand(-1, -1, -1, tier_v.shape[-1]))
    else:
        hit = torch.zeros_like(selected, dtype=torch.bool)
        keys = tier_k.new_zeros(batch, heads, k, tier_k.shape[-1], device=device)
        values = tier_v.new_zeros(batch, heads, k, tier_v.shape[-1], device=device)
    miss = (selected >= 0) & ~hit
    if retrieval.mapped_keys is not None:  # pinned host rows the accelerator reads where they lie
        tier_k, tier_v = retrieval.mapped_keys, retrieval.mapped_values
    b, h, _ = (i.to(tier_k.device) for i in miss.nonzero(as_tuple=True))
    t = selected[miss].to(tier_k.device)
    keys[miss] = tier_k[b, h, t].to(device, non_blocking=True)
    values[miss] = tier_v[b, h, t].to(device, non_blocking=True)
    return keys, values, int(hit.sum()), int(t.numel())


def retrieve(inputs: AttentionInputs, query: torch.Tensor, scale: float) -> AttentionInputs:
    """The attention inputs of a retrieval layer with the retrieved rows appended to the past block.

    Writes the new working set (``selected``, ``sel_keys``, ``sel_values``) and the counts
    (``hits``, ``fetched``) into ``inputs.retrieval`` at a decode step, and the count of rows copied
    for a chunk (every earlier row, appended whole: a tier on another device streams its chunks
    through :func:`chunk_attention` instead); the returned inputs have no tier (``retrieval`` is
    ``None``).

    Parameters
    ----------
    inputs : AttentionInputs
        A retrieval layer's inputs: past block = its held slots, ``retrieval`` its tier.
    query : torch.Tensor
        Post-RoPE queries ``(B, H, n, d)``.
    scale : float
        The attention's score scale (the proxy's logits use it too).

    """
    tier = inputs.retrieval
    if tier.counts is not None:
        return _retrieve_static(inputs, query, scale)
    first = int(inputs.first_index)
    device = inputs.past_keys.device
    allowed = candidates(tier, first, inputs.window)
    if query.shape[-2] == 1 and first:
        scale_rows = None if tier.proxy_scale is None else tier.proxy_scale[..., :first]
        scores = proxy_scores(query, tier.proxy_basis, tier.proxy_keys[..., :first, :], tier.tier_valid[..., :first],
                              scale, scale_rows)
        selected = select(scores, allowed, tier.top_k)
        keys, values, tier.hits, tier.fetched = _gather_rows(tier, selected, device)
        tier.selected, tier.sel_keys, tier.sel_values = selected, keys, values
        visible, index = selected >= 0, selected
    else:  # a chunk (or a first token) attends to every earlier token, copied for the call
        keys = tier.tier_keys[..., :first, :].to(device, non_blocking=True)
        values = tier.tier_values[..., :first, :].to(device, non_blocking=True)
        tier.hits, tier.fetched = 0, int(allowed.shape[0] * allowed.shape[1] * first)
        visible = allowed
        index = torch.arange(first, device=device).expand_as(allowed)
    return _appended(inputs, keys, values, visible, index)


def streams(inputs: AttentionInputs) -> bool:
    """Whether a retrieval layer's chunk goes through :func:`chunk_attention`: its tier is on another device.

    A tier on the accelerator is read in place by one call over held + earlier rows (a copy of the
    past block, no transfer); an offloaded one would have every earlier row copied to the
    accelerator at once, so it is streamed a block at a time instead.
    """
    return inputs.retrieval.tier_keys.device != inputs.past_keys.device


def chunk_attention(inputs: AttentionInputs, query: torch.Tensor, new_mask: torch.Tensor, scale: float,
                    softcap: float | None, attend: Callable[..., tuple[torch.Tensor, ...]]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A retrieval layer's chunk over its held slots, itself and every earlier tier row, a block of rows at a time.

    ``attend(inputs, query, mask, scale, softcap)`` is the attention op with ``with_lse=True``
    (output, masses, log-sum-exp). It runs once over the held slots and the chunk, then once per
    block of earlier, not held tier rows (:func:`~kvpress_aqua.ops.limits.tier_block_rows` tokens,
    copied to the accelerator for that call, the chunk's own keys masked out); the outputs are
    merged by their log-sum-exp, exactly one softmax over all of them. Returns ``(output,
    mass_past, mass_new)``, the masses those of the held slots' call (a retrieval layer ranks by
    recency; it reads none). Records the rows copied in ``inputs.retrieval.fetched``.
    """
    tier, first = inputs.retrieval, int(inputs.first_index)
    held = dataclasses.replace(inputs, retrieval=None)
    out, mass_past, mass_new, lse = attend(held, query, new_mask, scale, softcap)
    allowed = candidates(tier, first, inputs.window)
    tier.hits, tier.fetched = 0, int(allowed.shape[0] * allowed.shape[1] * first)
    block = limits.tier_block_rows(allowed.shape[0] * allowed.shape[1],
                                   (tier.tier_keys.shape[-1] + tier.tier_values.shape[-1])
                                   * tier.tier_keys.element_size())
    device, unseen = inputs.past_keys.device, torch.zeros_like(new_mask)
    merged = out.float()
    for lo in range(0, first, block):
        hi = min(first, lo + block)
        index = torch.arange(lo, hi, device=device, dtype=torch.int32).expand(*allowed.shape[:2], -1)
        rows = dataclasses.replace(
            held, past_keys=tier.tier_keys[..., lo:hi, :].to(device),
            past_values=tier.tier_values[..., lo:hi, :].to(device), past_visible=allowed[..., lo:hi],
            past_index=index if inputs.window is not None else None, past_log_weight=None, exact_keys=None,
            exact_basis=None, exact_slot=None, want_mass=False)
        part, _, _, part_lse = attend(rows, query, unseen, scale, softcap)
        top = torch.maximum(lse, part_lse)
        safe = top.where(top > float("-inf"), 0.0)
        mine, theirs = (lse - safe).exp(), (part_lse - safe).exp()
        total = mine + theirs
        merged = (merged * mine[..., None] + part.float() * theirs[..., None]) / total.where(total > 0, 1.0)[..., None]
        lse = (safe + total.log()).where(total > 0, float("-inf"))
    return merged.to(out.dtype), mass_past, mass_new


def _retrieve_static(inputs: AttentionInputs, query: torch.Tensor, scale: float) -> AttentionInputs:
    """:func:`retrieve` for a static decode step: chosen over the whole tier, rows read from it directly."""
    tier, first = inputs.retrieval, inputs.first_index
    if query.shape[-2] != 1:
        raise ValueError("a static retrieval cache decodes one token per step")
    allowed = candidates(tier, first, inputs.window)
    earlier = tier.tier_valid & (torch.arange(allowed.shape[-1], device=allowed.device) < first)
    scores = proxy_scores(query, tier.proxy_basis, tier.proxy_keys, earlier, scale, tier.proxy_scale)
    best = scores.masked_fill(~allowed, float("-inf")).topk(min(tier.top_k, scores.shape[-1]), dim=-1, sorted=False)
    visible, index = best.values > float("-inf"), best.indices
    keys = tier.tier_keys.gather(2, index[..., None].expand(-1, -1, -1, tier.tier_keys.shape[-1]))
    values = tier.tier_values.gather(2, index[..., None].expand(-1, -1, -1, tier.tier_values.shape[-1]))
    tier.counts.add_(torch.stack([torch.ones_like(tier.counts[0]), visible.sum()]))
    return _appended(inputs, keys, values, visible, index)


def _appended(inputs: AttentionInputs, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
              index: torch.Tensor) -> AttentionInputs:
    """Plain attention inputs: the held slots followed by the retrieved rows (their cache indices ``index``)."""
    log_weight = inputs.past_log_weight
    return dataclasses.replace(
        inputs,
        past_keys=torch.cat([inputs.past_keys, keys], dim=-2),
        past_values=torch.cat([inputs.past_values, values], dim=-2),
        past_visible=torch.cat([inputs.past_visible, visible], dim=-1),
        past_index=None if inputs.past_index is None else torch.cat([inputs.past_index, index.int()], dim=-1),
        past_log_weight=None if log_weight is None else torch.cat([log_weight, visible.float() * 0], dim=-1),
        retrieval=None,
    )

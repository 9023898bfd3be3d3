"""The tensors one attention call over a compressed layer reads, and the results it writes back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AttentionInputs", "RetrievalInputs"]


@dataclass
class RetrievalInputs:
    """A retrieval layer's second tier and working set, read by one attention call (shapes as below).

    ``T`` tokens seen (the tier holds every one, row ``t`` for cache index ``t``), ``k`` the
    working set, ``p`` proxy channels.

    Attributes
    ----------
    tier_keys, tier_values : torch.Tensor
        ``(B, H_kv, T, r)`` keys in their stored form and ``(B, H_kv, T, d_v)`` values of every token,
        on the tier's device (host memory when offloaded).
    tier_valid : torch.Tensor
        bool ``(B, H_kv, T)`` on the accelerator: False for padding.
    proxy_keys : torch.Tensor
        ``(B, H_kv, T, p)`` on the accelerator: every token's key projected on the proxy basis.
    proxy_basis : torch.Tensor
        ``(H_kv, d, p)`` (calibrated) or ``(B, H_kv, d, p)`` (per prompt): queries meet proxy keys as
        ``q @ basis``.
    proxy_scale : torch.Tensor or None
        float32 ``(B, H_kv, T)``: the scale of each int8 proxy key (``None``: proxy keys in the model dtype).
    held_index : torch.Tensor
        int32 ``(B, H_kv, S)``: the cache index of each held slot (-1 empty); held tokens are not retrieved.
    top_k : int
        Tokens retrieved per sequence and KV head at a decode step (a chunk of several queries
        attends to every earlier token).
    ws_index : torch.Tensor or None
        int64 ``(B, H_kv, k)``: the tokens of the working set, ascending (-1: none), from the last step.
    ws_keys, ws_values : torch.Tensor or None
        ``(B, H_kv, k, r)`` and ``(B, H_kv, k, d_v)`` on the accelerator: the working set's rows.
    selected, sel_keys, sel_values : torch.Tensor or None
        Written by the attention at a decode step: the new working set (int64 ``(B, H_kv, k)``, ascending,
        -1 where fewer than ``k`` tokens could be retrieved) and its rows on the accelerator.
    hits, fetched : int
        Written by the attention: retrieved rows found in the old working set, and rows copied from the tier.
    counts : torch.Tensor or None
        A static tier's int64 ``(2,)`` device counters (decode steps, rows read), advanced in place by
        the attention; its ``T`` is the tier's capacity and a step's cache index is a 0-d tensor.
    mapped_keys, mapped_values : torch.Tensor or None
        The rows of ``tier_keys`` and ``tier_values`` as accelerator tensors over their pinned host
        memory (an offloaded tier on a GPU): a decode step reads its misses from them on the device,
        so only those rows cross the host link, with no gather on the host. ``None``: misses are
        gathered where the tier lies and copied.

    """

    tier_keys: torch.Tensor
    tier_values: torch.Tensor
    tier_valid: torch.Tensor
    proxy_keys: torch.Tensor
    proxy_basis: torch.Tensor
    held_index: torch.Tensor
    top_k: int
    proxy_scale: torch.Tensor | None = None
    ws_index: torch.Tensor | None = None
    ws_keys: torch.Tensor | None = None
    ws_values: torch.Tensor | None = None
    selected: torch.Tensor | None = None
    sel_keys: torch.Tensor | None = None
    sel_values: torch.Tensor | None = None
    hits: int = 0
    fetched: int = 0
    counts: torch.Tensor | None = None
    mapped_keys: torch.Tensor | None = None
    mapped_values: torch.Tensor | None = None


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
    past_log_weight : torch.Tensor or None
        float32 ``(B, H_kv, S)``: how many tokens each past slot stands for, as a log; added to its
        score (a weighted summary's estimator); ``None``: every slot stands for itself.
    window : int or None
        The model's own window on this layer (a query at index ``t`` sees indices ``> t - window``).
    first_index : int or torch.Tensor
        Cache index of the chunk's first token (a 0-d tensor in a static decode step).
    key_basis : torch.Tensor or None
        ``(H_kv, d, r)``: queries are projected by it before they meet stored keys; ``None``: keys
        are stored as they come.
    query_channels : int or None
        Channels of each projected query kept by magnitude (AQUA's compute mode); ``None`` keeps all.
    exact_keys, exact_basis, exact_slot : torch.Tensor or None
        AQUA's exact tokens: their dropped key channels ``(B, H_kv, E, d - r)``, the basis of those
        channels ``(H_kv, d, d - r)`` and the past slot of each row, int64 ``(B, H_kv, E)``. A row that
        stands for no past token is zero with slot -1.
    want_mass : bool
        Whether the attention mass per slot is needed (score-based token policies).
    mass_rows : int or None
        Only the chunk's last ``mass_rows`` queries give mass (SnapKV's observation window);
        ``None``: every query does.
    score_out, new_slots : torch.Tensor or None
        A static decode step's own accumulation: the layer's float32 ``(B, H_kv, S)`` scores, which
        the call scales by ``score_decay`` and adds its mass to in place (``mass_new`` at the new
        token's slots ``new_slots``, int64 ``(B, H_kv, n)``), so that nothing waits for a later fold.
    score_decay : float
        Factor applied to ``score_out`` before the mass is added (the token policy's).
    mass_past, mass_new : torch.Tensor or None
        Written by the attention: float32 ``(B, H_kv, S)`` and ``(B, H_kv, n)``, the attention weight
        each past slot and each new token received, summed over the chunk's queries and over the
        query heads of each KV group (zeros when ``want_mass`` is False).
    new_valid : torch.Tensor or None
        Written by the attention: bool ``(B, n)``, False for new tokens that are padding.
    retrieval : RetrievalInputs or None
        A retrieval layer's tier: the attention adds the tokens it retrieves to the past block.

    """

    layer_idx: int
    past_keys: torch.Tensor
    past_values: torch.Tensor
    past_visible: torch.Tensor
    keys_new: torch.Tensor
    values_new: torch.Tensor
    past_index: torch.Tensor | None = None
    past_log_weight: torch.Tensor | None = None
    window: int | None = None
    first_index: int | torch.Tensor = 0
    key_basis: torch.Tensor | None = None
    query_channels: int | None = None
    exact_keys: torch.Tensor | None = None
    exact_basis: torch.Tensor | None = None
    exact_slot: torch.Tensor | None = None
    want_mass: bool = False
    mass_rows: int | None = None
    score_out: torch.Tensor | None = None
    new_slots: torch.Tensor | None = None
    score_decay: float = 1.0
    mass_past: torch.Tensor | None = None
    mass_new: torch.Tensor | None = None
    new_valid: torch.Tensor | None = None
    retrieval: RetrievalInputs | None = None

    @property
    def done(self) -> bool:
        """Whether an attention call has written its results."""
        return self.new_valid is not None

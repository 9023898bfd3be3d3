"""One decoder layer of the compressing cache: the ``transformers`` layer contract, eviction and the hand-off.

Contract of :meth:`CompressedLayer.update` (called with ``n`` new post-RoPE tokens):

1. It folds in what the layer's previous attention call wrote (padding among the new tokens,
   attention mass, AQUA's exact keys), unless the cache already did (:meth:`CompressedLayer.finalize`).
2. It stores the new tokens (keys rotated and pruned under AQUA) and counts them as seen: a chunk
   is appended after the held slots, evicting first down to the budget; a decode step fills the
   next empty slot of a buffer that grows in small steps up to ``budget + 1`` slots, and then
   overwrites the lowest-ranked slot in place (static shape).
3. It hands the attention call that follows its inputs as plain tensors
   (:class:`~kvpress_aqua.ops.inputs.AttentionInputs`); the attention writes its results there.

The layer holds at most ``budget + n`` slots while a chunk of ``n`` tokens is attended and
``budget + 1`` while decoding. ``get_seq_length()`` counts tokens *seen*, never tokens held:
``generate`` derives positions from it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..attention import dispatch
from ..ops.inputs import AttentionInputs
from ..ops.reference import fold_scores
from ..policies.base import ChannelPolicy, SlotView, TokenPolicy
from .accounting import capped_budget, grown_capacity
from .contract import LayerContract
from .exact import ExactRows
from .slots import SlotStore
from .static import StaticDecoding
from .tier import RetrievalTier

__all__ = ["CompressedLayer"]


class CompressedLayer(StaticDecoding, LayerContract):
    """One decoder layer's compressed storage.

    Parameters
    ----------
    layer_idx : int
        The decoder layer this storage belongs to.
    num_kv_heads, head_dim : int
        The layer's KV heads and per-head key/value width.
    token_policy : TokenPolicy or None
        Ranks held slots for eviction; ``None`` keeps every token (unless ``window`` is set).
    channel_policy : ChannelPolicy or None
        Rotates keys/queries and sets the stored key width; ``None`` stores keys as they come.
    window : int or None
        The model's own sliding window for this layer: older tokens are never attended again, so
        the budget is capped at ``window - 1`` and such tokens are evicted first.
    heads : range or None
        Which of the model's ``num_heads`` KV heads this layer holds (a tensor-parallel rank's
        share; policies that draw at random draw for every head and keep these); ``None``: all.
    num_heads : int or None
        The model's KV heads (with ``heads``).

    Attributes
    ----------
    slots : SlotStore
        Keys, values, index, validity and scores of the held slots.
    exact : ExactRows or None
        AQUA's exact tokens (only when the channel policy drops channels and keeps some tokens exact).
    stash : ExactRows or None
        A static layer's one extra exact row: the last decoded token's, stored at the next step.
    left_pad : torch.Tensor
        int32 ``(batch, 1, 1)``: left-padding tokens of each sequence seen so far.

    """

    def __init__(
        self,
        layer_idx: int,
        num_kv_heads: int,
        head_dim: int,
        token_policy: TokenPolicy | None = None,
        channel_policy: ChannelPolicy | None = None,
        window: int | None = None,
        heads: range | None = None,
        num_heads: int | None = None,
    ) -> None:
        self.slots = SlotStore()
        super().__init__()
        self.layer_idx, self.num_kv_heads, self.head_dim = layer_idx, num_kv_heads, head_dim
        self.token_policy, self.channel_policy, self.window = token_policy, channel_policy, window
        self.heads, self.num_heads = heads, num_heads
        self.budget = capped_budget(token_policy.budget if token_policy is not None else None, window)
        self.needs_scores = bool(token_policy is not None and token_policy.needs_scores)
        self.weighted = bool(token_policy is not None and token_policy.weights_slots)
        self.chooses = token_policy is not None and token_policy.budget is None
        self.key_dim = channel_policy.key_dim(layer_idx) if channel_policy is not None else head_dim
        pruned = channel_policy is not None and self.key_dim < head_dim
        sinks, recent = (channel_policy.exact_sinks, channel_policy.exact_recent) if pruned else (0, 0)
        self.exact = ExactRows(sinks, recent) if sinks + recent else None
        self.stash: ExactRows | None = None
        retrieves = token_policy is not None and token_policy.retrieves
        self.tier = RetrievalTier(token_policy.layer_top_k(layer_idx), token_policy.offload is not None,
                                  token_policy.proxy_dtype == "int8") if retrieves else None
        self.seen: int | torch.Tensor = 0
        self.static = False
        self.left_pad: torch.Tensor | None = None
        self._pending: AttentionInputs | None = None
        self._pending_slots: torch.Tensor | None = None

    # the transformers base class and code that reads a layer know ``keys`` and ``values``
    keys = property(lambda self: self.slots.keys, lambda self, value: setattr(self.slots, "keys", value))
    values = property(lambda self: self.slots.values, lambda self, value: setattr(self.slots, "values", value))
    index = property(lambda self: self.slots.index, doc="int32 cache index per slot (see :class:`SlotStore`).")
    valid = property(lambda self: self.slots.valid, doc="bool validity per slot (see :class:`SlotStore`).")
    score = property(lambda self: self.slots.score, doc="float32 attention mass per slot, or None.")

    # ------------------------------------------------------------------ storage
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        """Allocate empty ``(batch, kv_heads, 0, ...)`` tensors matching the first update."""
        self.dtype, self.device = key_states.dtype, key_states.device
        v_dim = value_states.shape[-1] if value_states is not None else self.head_dim
        self.slots.allocate(key_states, self.num_kv_heads, self.key_dim, v_dim, self.needs_scores, self.weighted)
        batch = key_states.shape[0]
        self.left_pad = torch.zeros(batch, 1, 1, dtype=torch.int32, device=key_states.device)
        if self.exact is not None:
            self.exact.allocate(key_states, batch, self.num_kv_heads, self.head_dim - self.key_dim)
        if self.tier is not None:
            self.tier.allocate(key_states, self.num_kv_heads, self.key_dim, v_dim, self.token_policy.rank)
        self.is_initialized = True

    def _check_new(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.ndim != 4 or key_states.shape[1] != self.num_kv_heads or key_states.shape[-1] != self.head_dim:
            raise ValueError(
                f"layer {self.layer_idx}: expected keys of shape (batch, {self.num_kv_heads}, new, {self.head_dim}), "
                f"got {tuple(key_states.shape)}; is this cache built for this model?"
            )
        if value_states.shape[:-1] != key_states.shape[:-1]:
            raise ValueError(
                f"layer {self.layer_idx}: values {tuple(value_states.shape)} do not match keys "
                f"{tuple(key_states.shape)}"
            )
        if self.is_initialized and key_states.shape[0] != self.keys.shape[0]:
            raise ValueError(
                f"this cache holds {self.keys.shape[0]} sequences but was given a batch of {key_states.shape[0]}; "
                "build a new CompressedCache for a different batch size (or call cache.reset())"
            )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold in the previous attention, store ``n`` new tokens, and hand the attention its inputs.

        Parameters
        ----------
        key_states, value_states : torch.Tensor
            Post-RoPE keys and values ``(batch, kv_heads, n, head_dim)``.

        Returns
        -------
        tuple of torch.Tensor
            The stored keys ``(batch, kv_heads, slots, key_dim)`` and values; only
            :func:`~kvpress_aqua.attention.dispatch.compressed_attention` reads them correctly.

        """
        self._check_new(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.finalize()
        n = key_states.shape[-2]
        policy, store = self.channel_policy, self.slots
        stored = policy.project_keys(self.layer_idx, key_states) if policy is not None else key_states
        if self.static:
            return self._static_step(stored, key_states, value_states)
        if self.tier is not None:
            self._to_tier(stored, key_states, value_states)
        if self.budget is not None and n == 1:
            past, visible, new_slots = self._write_one(stored, value_states)
        else:
            if store.used < store.capacity:
                store.keep_first(store.used)  # drop the empty tail of a grown decode buffer
            if self.budget is not None and store.used > self.budget:
                self._evict()
            past = store.used
            new_slots = store.append(stored, value_states, self.seen)
            visible = store.valid[..., :past]
        self.seen += n
        inputs = self._attention_inputs(past, visible, key_states, value_states)
        self._pending, self._pending_slots = inputs, new_slots
        dispatch.hand_off(inputs)
        return self.keys, self.values

    def _to_tier(self, stored: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write the new tokens to the retrieval tier with their proxy keys (a static tier: in place, at ``seen``).

        A per-prompt basis is fit when the first call is folded (its padding is known then), and
        that call's proxy keys are written then: its chunk attends to every token, not by proxy.
        """
        tier, policy = self.tier, self.token_policy
        if tier.basis is None and not policy.per_prompt:
            tier.basis = policy.proxy_basis(self.layer_idx)
        proxy = key_states.new_zeros(*key_states.shape[:-1], policy.rank) if tier.basis is None else \
            key_states @ (tier.basis if tier.basis.ndim == 4 else tier.basis[None])
        if tier.static:
            tier.write(self.seen, stored, value_states, proxy)
        else:
            tier.append(stored, value_states, proxy)

    def _attention_inputs(
        self, past: int, visible: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor,
        first_index: int | torch.Tensor | None = None,
    ) -> AttentionInputs:
        policy, store = self.channel_policy, self.slots
        exact = self.exact is not None and past > 0
        return AttentionInputs(
            layer_idx=self.layer_idx,
            past_keys=store.keys[:, :, :past],
            past_values=store.values[:, :, :past],
            past_visible=visible,
            keys_new=key_states,
            values_new=value_states,
            past_index=store.index[..., :past] if self.window is not None else None,
            past_log_weight=store.log_weight[..., :past] if store.log_weight is not None else None,
            window=self.window,
            first_index=self.seen - key_states.shape[-2] if first_index is None else first_index,
            key_basis=policy.key_basis(self.layer_idx) if policy is not None else None,
            query_channels=policy.query_channels(self.layer_idx) if policy is not None else None,
            exact_keys=self.exact.keys if exact else None,
            exact_basis=policy.residual_basis(self.layer_idx) if exact else None,
            exact_slot=self.exact.slot if exact else None,
            want_mass=self.needs_scores,
            mass_rows=self.token_policy.score_rows if self.needs_scores else None,
            retrieval=self.tier.inputs(store.index[..., :past]) if self.tier is not None else None,
        )

    def finalize(self) -> None:
        """Fold the last attention call's results in and evict down to the budget if a chunk overfilled it.

        The cache calls it when the next layer updates (so that a long prompt fed in one forward is
        held in full by one layer at a time) and at this layer's own next update; the result is the
        same as evicting at the next update, because the ranking reads the same scores. A no-op
        when nothing is pending.
        """
        inputs, new_slots = self._pending, self._pending_slots
        if inputs is None:
            return
        self._pending = self._pending_slots = None
        if not inputs.done:  # the attention never ran (an error mid-forward): the chunk is held as stored
            return
        # a report may ask outside the inference mode the tensors were made in: work in their mode
        with torch.inference_mode(self.keys.is_inference()), torch.no_grad():
            self._fold(inputs, new_slots)
            if self.budget is not None and self.slots.used > self.budget + 1:
                self._evict()
            if self.chooses:
                self._compact()

    def _fold(self, inputs: AttentionInputs, new_slots: torch.Tensor) -> None:
        """Record what the attention call learnt: padding among the new tokens, attention mass, exact keys."""
        new_valid, store = inputs.new_valid, self.slots
        store.valid.scatter_(2, new_slots, new_valid[:, None, :].expand(-1, self.num_kv_heads, -1))
        if self.tier is not None:
            first = self.seen - new_valid.shape[-1]
            if self.tier.basis is None:  # a per-prompt basis: fit on this first call's real keys
                self.tier.fit(self.token_policy.proxy_basis(self.layer_idx, inputs.keys_new, new_valid),
                              inputs.keys_new, first)
            self.tier.fold(inputs.retrieval, new_valid, first)
        self.left_pad += (~new_valid).sum(-1, dtype=torch.int32)[:, None, None]
        if self.exact is not None:
            dropped = self.channel_policy.residual_keys(self.layer_idx, inputs.keys_new)
            n = new_slots.shape[-1]
            self.exact.store(dropped, new_slots, new_valid, self.seen - n, self.left_pad[:, 0].long())
        if store.score is not None:
            fold_scores(store.score, self.token_policy.score_decay, inputs.mass_past, inputs.mass_new, new_slots)

    def _write_one(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Store one decoded token in the decode buffer: the next empty slot, else the lowest-ranked one.

        The buffer grows (by :func:`~kvpress_aqua.core.accounting.grown_capacity`) only when every
        slot is taken and it is smaller than ``budget + 1``; at ``budget + 1`` the token overwrites
        each row's lowest-ranked slot in place. Returns the past slots the token attends (a prefix
        of the buffer), their visibility and the token's slot ``(batch, kv_heads, 1)``.
        """
        store = self.slots
        if store.used == store.capacity == self.budget + 1:
            victim = self._priority().argmin(dim=-1, keepdim=True)  # (batch, kv_heads, 1)
            store.overwrite(victim, keys, values, self.seen)
            if self.exact is not None:
                self.exact.blank(victim)
            return store.capacity, store.valid.scatter(2, victim, False), victim
        if store.used == store.capacity:
            store.grow(grown_capacity(store.capacity, self.budget))
        past = store.used
        return past, store.valid[..., :past], store.write_next(keys, values, self.seen)

    def _evict(self) -> None:
        """Keep the ``budget`` highest-ranked slots, in their original order (new, compact tensors)."""
        kept = self._priority().topk(self.budget, dim=-1).indices.sort(dim=-1).values
        if self.exact is not None:
            self.exact.follow(kept, self.slots.capacity)
        self.slots.keep(kept)

    def _compact(self) -> None:
        """Keep the slots a choosing policy picks, as long as it picks (each block summary it completes)."""
        store = self.slots  # no budget: every update appends, so the buffer has no empty tail
        while (choice := self.token_policy.compact(self.view())) is not None:
            kept, log_weight = choice
            if self.exact is not None:
                self.exact.follow(kept, store.capacity)
            store.keep(kept)
            if log_weight is not None:
                store.log_weight = log_weight.to(torch.float32).contiguous()

    def view(self) -> SlotView:
        """The read-only view a token policy decides from."""
        store = self.slots
        return SlotView(store.index, store.valid, store.score, self.seen, self.left_pad, self.layer_idx,
                        store.keys, store.values, store.log_weight, self.heads, self.num_heads)

    def _priority(self) -> torch.Tensor:
        store = self.slots
        # a choosing policy ranks nothing: on the model's sliding layers the oldest tokens go first
        ranks = self.token_policy is not None and not self.chooses
        rank = self.token_policy.priority(self.view()) if ranks else store.index.float()
        if self.window is not None:
            rank = rank.masked_fill(store.index <= self.seen - self.window, float("-inf"))
        return rank.masked_fill(~store.valid, float("-inf"))

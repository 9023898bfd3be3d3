"""The compressing cache: storage, eviction mechanics and exact memory accounting.

:class:`CompressedCache` is a ``transformers`` ``Cache`` made of one :class:`CompressedLayer` per
decoder layer. A layer owns its tensors (``(batch, kv_heads, slots, ...)``, see
:mod:`kvpress_aqua.accounting` for the layout) and asks its policies only two questions: which
slots to keep (a :class:`~kvpress_aqua.policies.base.TokenPolicy` ranks them) and how many rotated
key channels to store (a :class:`~kvpress_aqua.policies.base.ChannelPolicy`).

Contract of :meth:`CompressedLayer.update` (called with ``n`` new post-RoPE tokens):

1. It folds in what the layer's previous attention call wrote (padding among the new tokens,
   attention mass, AQUA's exact keys), unless the cache already did (:meth:`CompressedLayer.finalize`).
2. It stores the new tokens (keys rotated and pruned under AQUA) and counts them as seen: a chunk
   is appended after the held slots, evicting first down to the budget; a decode step fills the
   next empty slot of a buffer that grows in small steps up to ``budget + 1`` slots, and then
   overwrites the lowest-ranked slot in place (static shape).
3. It hands the attention call that follows its inputs as plain tensors
   (:class:`~kvpress_aqua.attention.AttentionInputs`); the attention writes its results there.

The cache finalizes a layer when the next layer updates, which evicts a chunk that overfilled the
budget: so the layer holds at most ``budget + n`` slots while a chunk of ``n`` tokens is attended,
``budget + 1`` while decoding, and a prompt fed in one forward is held in full by one layer at a
time. Positions come from ``get_seq_length()``, which counts tokens *seen*, never
tokens held.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.table import Table
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from ..attention import dispatch, switch
from ..model_info import ModelInfo
from ..ops.inputs import AttentionInputs
from ..policies.base import ChannelPolicy, SlotView, TokenPolicy
from ..util.compat import cache_kwargs
from .accounting import capped_budget, dense_layer_tokens, grown_capacity

__all__ = ["CompressedCache", "CompressedLayer", "MemoryReport"]

_TOKENS = itertools.count()


class CompressedLayer(CacheLayerMixin):
    """One decoder layer's compressed storage.

    Parameters
    ----------
    layer_idx : int
        The decoder layer this storage belongs to.
    num_kv_heads, head_dim : int
        The layer's KV heads and per-head key/value width.
    token_policy : TokenPolicy or None
        Ranks held slots for eviction; ``None`` keeps every token (unless ``window`` is set).
    channel : ChannelPolicy or None
        Rotates keys/queries and sets the stored key width; ``None`` stores keys as they come.
    window : int or None
        The model's own sliding window for this layer: older tokens are never attended again, so
        the budget is capped at ``window - 1`` and such tokens are evicted first.

    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        layer_idx: int,
        num_kv_heads: int,
        head_dim: int,
        token_policy: TokenPolicy | None = None,
        channel: ChannelPolicy | None = None,
        window: int | None = None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.token_policy = token_policy
        self.channel = channel
        self.window = window
        self.budget = capped_budget(token_policy.budget if token_policy is not None else None, window)
        self.needs_scores = bool(token_policy is not None and token_policy.needs_scores)
        self.key_dim = channel.key_dim(layer_idx) if channel is not None else head_dim
        pruned = channel is not None and self.key_dim < head_dim
        self.exact_sinks = channel.exact_sinks if pruned else 0
        self.exact_recent = channel.exact_recent if pruned else 0
        self.seen = 0
        self.used = 0
        self.index: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.score: torch.Tensor | None = None
        self.start: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.exact_slot: torch.Tensor | None = None
        self._pending: AttentionInputs | None = None
        self._pending_slots: torch.Tensor | None = None

    # ------------------------------------------------------------------ storage
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        """Allocate empty ``(batch, kv_heads, 0, ...)`` tensors matching the first update."""
        batch = key_states.shape[0]
        dev, dtype = key_states.device, key_states.dtype
        self.dtype, self.device = dtype, dev
        v_dim = value_states.shape[-1] if value_states is not None else self.head_dim
        self.keys = key_states.new_empty(batch, self.num_kv_heads, 0, self.key_dim)
        self.values = key_states.new_empty(batch, self.num_kv_heads, 0, v_dim)
        self.index = torch.empty(batch, self.num_kv_heads, 0, dtype=torch.int32, device=dev)
        self.valid = torch.empty(batch, self.num_kv_heads, 0, dtype=torch.bool, device=dev)
        self.score = (
            torch.empty(batch, self.num_kv_heads, 0, dtype=torch.float32, device=dev) if self.needs_scores else None
        )
        self.start = torch.zeros(batch, 1, 1, dtype=torch.int32, device=dev)
        exact = self.exact_sinks + self.exact_recent
        if exact:
            self.residual = key_states.new_zeros(batch, self.num_kv_heads, exact, self.head_dim - self.key_dim)
            self.exact_slot = torch.zeros(batch, self.num_kv_heads, exact, dtype=torch.int64, device=dev)
        self.is_initialized = True

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = ("keys", "values", "residual", "index", "valid", "score", "start", "exact_slot")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def _check_new(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.ndim != 4 or key_states.shape[1] != self.num_kv_heads or key_states.shape[-1] != self.head_dim:
            raise ValueError(
                f"layer {self.layer_idx}: expected keys of shape (batch, {self.num_kv_heads}, new, {self.head_dim}), "
                f"got {tuple(key_states.shape)}; is this cache built for this model?"
            )
        if value_states.shape[:-1] != key_states.shape[:-1]:
            raise ValueError(
                f"layer {self.layer_idx}: values {tuple(value_states.shape)} "
                f"do not match keys {tuple(key_states.shape)}"
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
            :func:`~kvpress_aqua.attention.compressed_attention` reads them correctly.

        """
        self._check_new(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.finalize()
        n = key_states.shape[-2]
        stored = self.channel.project_keys(self.layer_idx, key_states) if self.channel is not None else key_states
        if self.budget is not None and n == 1:
            past, visible, new_slots = self._write_one(stored, value_states)
        else:
            if self.used < self.keys.shape[-2]:
                self._keep_first(self.used)  # drop the empty tail of a grown decode buffer
            if self.budget is not None and self.used > self.budget:
                self._evict()
            past = self.used
            new_slots = self._append(stored, value_states)
            visible = self.valid[..., :past]
        self.seen += n
        inputs = self._attention_inputs(past, visible, key_states, value_states)
        self._pending, self._pending_slots = inputs, new_slots
        dispatch.hand_off(inputs)
        return self.keys, self.values

    def _attention_inputs(
        self, past: int, visible: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> AttentionInputs:
        channel, exact = self.channel, self.residual is not None and past > 0
        return AttentionInputs(
            layer_idx=self.layer_idx,
            past_keys=self.keys[:, :, :past],
            past_values=self.values[:, :, :past],
            past_visible=visible,
            keys_new=key_states,
            values_new=value_states,
            past_index=self.index[..., :past] if self.window is not None else None,
            window=self.window,
            first_index=self.seen - key_states.shape[-2],
            key_basis=channel.key_basis(self.layer_idx) if channel is not None else None,
            query_channels=channel.query_channels(self.layer_idx) if channel is not None else None,
            residual=self.residual if exact else None,
            residual_basis=channel.residual_basis(self.layer_idx) if exact else None,
            exact_slot=self.exact_slot if exact else None,
            want_mass=self.needs_scores,
        )

    def finalize(self) -> None:
        """Fold the last attention call's results in and evict down to the budget if a chunk overfilled it.

        The cache calls it when the next layer updates (so that a long prompt fed in one forward is
        held in full by one layer at a time) and at this layer's own next update; the
        result is the same as evicting at the next update, because the ranking reads the same
        scores. A no-op when nothing is pending.
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
            if self.budget is not None and self.used > self.budget + 1:
                self._evict()

    def _fold(self, inputs: AttentionInputs, new_slots: torch.Tensor) -> None:
        """Record what the attention call learnt: padding among the new tokens, attention mass, exact keys."""
        new_valid = inputs.new_valid
        self.valid.scatter_(2, new_slots, new_valid[:, None, :].expand(-1, self.num_kv_heads, -1))
        self.start += (~new_valid).sum(-1, dtype=torch.int32)[:, None, None]
        if self.residual is not None:
            self._store_residual(inputs.keys_new, new_slots, new_valid)
        if self.score is not None:
            decay = self.token_policy.score_decay
            if decay != 1.0:
                self.score.mul_(decay)
            self.score[..., :inputs.mass_past.shape[-1]] += inputs.mass_past
            self.score.scatter_add_(2, new_slots, inputs.mass_new)

    def _new_meta(self, n: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(self.seen, self.seen + n, dtype=torch.int32, device=self.index.device)
        index = index.expand(batch, self.num_kv_heads, n)
        valid = torch.ones(batch, self.num_kv_heads, n, dtype=torch.bool, device=self.valid.device)
        return index, valid

    def _append(self, keys_new: torch.Tensor, values_new: torch.Tensor) -> torch.Tensor:
        """Store new tokens (keys already in stored form) after the held slots; returns their slots."""
        batch, _, n, _ = keys_new.shape
        first = self.keys.shape[-2]
        index, valid = self._new_meta(n, batch)
        self.keys = torch.cat([self.keys, keys_new], dim=-2)
        self.values = torch.cat([self.values, values_new], dim=-2)
        self.index = torch.cat([self.index, index], dim=-1)
        self.valid = torch.cat([self.valid, valid], dim=-1)
        if self.score is not None:
            self.score = torch.cat([self.score, self.score.new_zeros(batch, self.num_kv_heads, n)], dim=-1)
        self.used = first + n
        slots = torch.arange(first, first + n, device=self.keys.device)
        return slots.expand(batch, self.num_kv_heads, n)

    def _write_one(
        self, keys_new: torch.Tensor, values_new: torch.Tensor
    ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Store one decoded token in the fixed-size buffer: the next empty slot, else the lowest-ranked one.

        The buffer grows (by :func:`~kvpress_aqua.accounting.grown_capacity`) only when every slot is
        taken and it is smaller than ``budget + 1``; at ``budget + 1`` the token overwrites each
        row's lowest-ranked slot in place. Returns the past slots the token attends (a prefix of
        the buffer), their visibility and the token's slot ``(batch, kv_heads, 1)``.
        """
        batch = keys_new.shape[0]
        capacity = self.keys.shape[-2]
        if self.used == capacity and capacity == self.budget + 1:
            victim = self._overwrite(keys_new, values_new)
            return capacity, self.valid.scatter(2, victim, False), victim
        if self.used == capacity:
            self._grow(grown_capacity(capacity, self.budget))
        slot = self.used
        index, valid = self._new_meta(1, batch)
        self.keys[:, :, slot:slot + 1] = keys_new
        self.values[:, :, slot:slot + 1] = values_new
        self.index[..., slot:slot + 1] = index
        self.valid[..., slot:slot + 1] = valid
        self.used += 1
        new_slots = torch.full((batch, self.num_kv_heads, 1), slot, dtype=torch.int64, device=self.keys.device)
        return slot, self.valid[..., :slot], new_slots

    def _overwrite(self, keys_new: torch.Tensor, values_new: torch.Tensor) -> torch.Tensor:
        """Write one new token over each row's lowest-ranked slot, in place (static shapes)."""
        victim = self._priority().argmin(dim=-1, keepdim=True)  # (batch, kv_heads, 1)
        index, valid = self._new_meta(1, keys_new.shape[0])
        self.keys.scatter_(2, victim[..., None].expand(-1, -1, -1, self.key_dim), keys_new)
        self.values.scatter_(2, victim[..., None].expand(-1, -1, -1, self.values.shape[-1]), values_new)
        self.index.scatter_(2, victim, index)
        self.valid.scatter_(2, victim, valid)
        if self.score is not None:
            self.score.scatter_(2, victim, 0.0)
        if self.exact_slot is not None:  # the victim's exact rows, if any, go blank
            self.residual.masked_fill_((self.exact_slot == victim)[..., None], 0.0)
        return victim

    def _evict(self) -> None:
        """Keep the ``budget`` highest-ranked slots, in their original order."""
        self._keep(self._priority().topk(self.budget, dim=-1).indices.sort(dim=-1).values)

    def _keep(self, slots: torch.Tensor) -> None:
        """Keep only ``slots`` ``(batch, kv_heads, k)``; the result is new, compact tensors."""
        if self.exact_slot is not None:  # old slot -> its place among the kept ones; evicted rows go blank
            place = self.exact_slot.new_full(self.index.shape, -1).scatter_(
                2, slots, torch.arange(slots.shape[-1], device=slots.device).expand_as(slots))
            moved = place.gather(2, self.exact_slot)
            self.residual.masked_fill_((moved < 0)[..., None], 0.0)
            self.exact_slot = moved.clamp_min(0)
        width = self.keys.shape[-1], self.values.shape[-1]
        self.keys = self.keys.gather(2, slots[..., None].expand(-1, -1, -1, width[0]))
        self.values = self.values.gather(2, slots[..., None].expand(-1, -1, -1, width[1]))
        self.index = self.index.gather(2, slots)
        self.valid = self.valid.gather(2, slots)
        if self.score is not None:
            self.score = self.score.gather(2, slots)
        self.used = slots.shape[-1]

    def _keep_first(self, slots: int) -> None:
        """Keep the first ``slots`` slots (new, compact tensors; exact rows never point past them)."""
        for name in ("keys", "values", "index", "valid", "score"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor[:, :, :slots].clone())

    def _grow(self, total: int) -> None:
        """Append empty slots (invalid, index -1) up to ``total``; written in place by later decode steps."""
        batch, heads, slots, _ = self.keys.shape
        extra = total - slots
        self.keys = torch.cat([self.keys, self.keys.new_zeros(batch, heads, extra, self.keys.shape[-1])], dim=2)
        self.values = torch.cat([self.values, self.values.new_zeros(batch, heads, extra, self.values.shape[-1])], 2)
        self.index = torch.cat([self.index, self.index.new_full((batch, heads, extra), -1)], dim=-1)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(batch, heads, extra)], dim=-1)
        if self.score is not None:
            self.score = torch.cat([self.score, self.score.new_zeros(batch, heads, extra)], dim=-1)

    def view(self) -> SlotView:
        """The read-only view a token policy decides from."""
        return SlotView(self.index, self.valid, self.score, self.seen, self.start, self.layer_idx)

    def _priority(self) -> torch.Tensor:
        if self.token_policy is not None:
            rank = self.token_policy.priority(self.view())
        else:
            rank = self.index.float()
        if self.window is not None:
            rank = rank.masked_fill(self.index <= self.seen - self.window, float("-inf"))
        return rank.masked_fill(~self.valid, float("-inf"))

    def _store_residual(self, keys_new: torch.Tensor, new_slots: torch.Tensor, new_valid: torch.Tensor) -> None:
        """Keep the dropped channels of the chunk's sink tokens and of its last ``exact_recent`` tokens.

        Rows ``[0, exact_sinks)`` of :attr:`residual` hold the sequence's first real tokens; row
        ``exact_sinks + i % exact_recent`` holds token ``i`` while it is among the latest
        ``exact_recent``. :attr:`exact_slot` is the slot of each row's token. A row that stands for
        no held token (not written yet, padding, evicted, or a recent token that is also a sink and
        is read from its sink row) is all zeros, so it adds nothing wherever it points. A decode step
        writes only the new token's row (few kernels): a ring row a sink skipped keeps its older
        token, still held exactly where it points, so no token is ever counted twice.
        """
        sinks, recent = self.exact_sinks, self.exact_recent
        residual = self.channel.residual_keys(self.layer_idx, keys_new)  # (batch, kv_heads, n, head_dim - key_dim)
        batch, heads, n, width = residual.shape
        before = self.seen - n
        start = self.start[:, 0].long()  # (batch, 1): left padding, this chunk's included
        if n == 1 and recent:  # decoding: one scatter, to the token's sink row or to its ring row
            sink = new_valid & (before - start < sinks)  # (batch, 1)
            rows = torch.where(sink, before - start, sinks + before % recent)[:, None, :]
            self.residual.scatter_(2, rows[..., None].expand_as(residual), residual * new_valid[:, None, :, None])
            self.exact_slot.scatter_(2, rows.expand_as(new_slots), new_slots)
            return
        if recent:
            m = min(n, recent)
            index = torch.arange(before + n - m, before + n, device=residual.device)
            rows = sinks + index % recent
            plain = (new_valid[:, n - m:] & (index - start >= sinks))[:, None, :]  # index - start: real position
            self.residual.index_copy_(2, rows, residual[:, :, n - m:] * plain[..., None])
            self.exact_slot.index_copy_(2, rows, new_slots[:, :, n - m:])
        if sinks:
            # the token at real position p has cache index p + start; after left padding it is valid
            offset = torch.arange(sinks, device=residual.device) + start - before  # (batch, sinks)
            here = ((offset >= 0) & (offset < n))[:, None, :]
            at = offset.clamp(0, n - 1)[:, None, :].expand(batch, heads, sinks)
            taken = residual.gather(2, at[..., None].expand(batch, heads, sinks, width))
            self.residual[:, :, :sinks] = torch.where(here[..., None], taken, self.residual[:, :, :sinks])
            self.exact_slot[:, :, :sinks] = torch.where(here, new_slots.gather(2, at), self.exact_slot[:, :, :sinks])

    # --------------------------------------------------- transformers contract
    def get_seq_length(self) -> int:
        """Tokens seen (not held): ``generate`` derives positions from it."""
        return self.seen

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        """Announce a key axis of just the new chunk, placed right after the tokens seen.

        ``query_length`` is an int since transformers 5.4 and a ``cache_position`` tensor before.
        """
        n = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return n, self.seen

    def get_max_length(self) -> int:
        """No fixed maximum of tokens seen."""
        return -1

    get_max_cache_shape = get_max_length

    def reset(self) -> None:
        """Drop every token; the layer starts empty."""
        for name in self._tensors():
            setattr(self, name, None)
        self.seen = self.used = 0
        self._pending = self._pending_slots = None
        self.is_initialized = False

    def _apply_rows(self, fn: Any) -> None:
        if self.is_initialized:
            self.finalize()  # the pending attention results are per row too
            for name, tensor in self._tensors().items():
                setattr(self, name, fn(tensor))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder sequences for beam search (every per-slot tensor follows)."""
        self._apply_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each sequence ``repeats`` times (``num_return_sequences``)."""
        self._apply_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the sequences ``indices``."""
        self._apply_rows(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Cropping would need evicted tokens back; a compressing layer refuses it."""
        if tokens_to_remove != 0:
            raise ValueError(
                "a compressing cache cannot be cropped (evicted or pruned keys cannot be restored); "
                "assisted/speculative decoding needs a plain DynamicCache"
            )

    # --------------------------------------------------------------- accounting
    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds, metadata included."""
        return sum(t.nbytes for t in self._tensors().values())

    def held_tokens(self) -> int:
        """Valid tokens held, summed over sequences and KV heads."""
        return int(self.valid.sum()) if self.is_initialized else 0


@dataclass(frozen=True)
class MemoryRow:
    """One layer's line in a :class:`MemoryReport`."""

    layer: int
    kind: str
    slots: int
    held: int
    key_bytes: int
    value_bytes: int
    meta_bytes: int
    dense_bytes: int

    @property
    def total(self) -> int:
        """All bytes the layer holds."""
        return self.key_bytes + self.value_bytes + self.meta_bytes


@dataclass(frozen=True)
class MemoryReport:
    """Bytes held per layer and per kind, with what ``DynamicCache`` would hold; rich-renderable."""

    rows: tuple[MemoryRow, ...]
    policy_bytes: int
    seen: int

    @property
    def total(self) -> int:
        """Every byte the cache holds, projection matrices included."""
        return sum(r.total for r in self.rows) + self.policy_bytes

    @property
    def dense(self) -> int:
        """Bytes ``DynamicCache`` would hold after the same tokens."""
        return sum(r.dense_bytes for r in self.rows)

    def by_kind(self) -> dict[str, int]:
        """Bytes per kind: keys, values, slot metadata, policy tensors."""
        return {
            "keys": sum(r.key_bytes for r in self.rows),
            "values": sum(r.value_bytes for r in self.rows),
            "metadata": sum(r.meta_bytes for r in self.rows),
            "policy": self.policy_bytes,
        }

    def __rich__(self) -> Table:
        ratio = self.total / self.dense if self.dense else float("nan")
        table = Table(title=f"KV cache after {self.seen} tokens: {_fmt(self.total)} held, "
                      f"{_fmt(self.dense)} dense ({ratio:.1%})")
        for col in ("layer", "kind", "slots", "held tokens", "keys", "values", "metadata", "total", "dense"):
            table.add_column(col, justify="left" if col == "kind" else "right")
        for r in self.rows:
            table.add_row(str(r.layer), r.kind, str(r.slots), str(r.held), _fmt(r.key_bytes), _fmt(r.value_bytes),
                          _fmt(r.meta_bytes), _fmt(r.total), _fmt(r.dense_bytes))
        kinds = self.by_kind()
        table.add_section()
        table.add_row("all", "", "", str(sum(r.held for r in self.rows)), _fmt(kinds["keys"]), _fmt(kinds["values"]),
                      _fmt(kinds["metadata"]), _fmt(self.total), _fmt(self.dense))
        if self.policy_bytes:
            table.caption = f"total includes {_fmt(self.policy_bytes)} of AQUA projection matrices"
        return table

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {_fmt(v)}" for k, v in self.by_kind().items())
        return f"KV cache: {_fmt(self.total)} held ({kinds}) vs {_fmt(self.dense)} dense after {self.seen} tokens"


def _fmt(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


class CompressedCache(Cache):
    """A drop-in ``DynamicCache`` replacement that evicts tokens and prunes key channels.

    Parameters
    ----------
    model : PreTrainedModel
        The decoder the cache serves. Its attention implementation is switched to
        :func:`~kvpress_aqua.attention.compressed_attention` (registered through
        ``transformers.AttentionInterface``) when a policy needs it. Several caches may serve one
        model: the model gets its own attention back when the last of them is detached
        (:meth:`detach`) or garbage-collected, and a detached cache that is used again re-attaches.
    *policies : TokenPolicy or ChannelPolicy
        At most one of each kind, in any order. None at all gives a plain ``DynamicCache``.
    prefill_chunk : int, optional
        Chunk size used by :meth:`prefill` so that peak memory follows the budget, not the prompt.

    Examples
    --------
    >>> cache = CompressedCache(model, H2O(heavy=256, recent=64), Aqua(k_ratio=0.5))  # doctest: +SKIP
    >>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)  # doctest: +SKIP
    >>> cache.nbytes(), cache.dense_nbytes()  # doctest: +SKIP

    """

    def __init__(
        self, model: PreTrainedModel, *policies: TokenPolicy | ChannelPolicy, prefill_chunk: int | None = None
    ) -> None:
        if prefill_chunk is not None and prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk={prefill_chunk}: give a positive token count, or None for no chunking")
        self.info = ModelInfo.from_config(model.config)
        self.token_policy, self.channel = _split_policies(policies)
        self.policies = tuple(policies)
        self.prefill_chunk = prefill_chunk
        self._model = model
        if self.policies and not type(model).is_backend_compatible():
            raise ValueError(
                f"model type {self.info.model_type!r} ({type(model).__name__}) does not use transformers' "
                "AttentionInterface, so its attention cannot read a compressed cache; use a model that supports "
                "attn_implementation switching (Llama, Qwen, Mistral, Gemma, Phi-3...)"
            )
        if self.token_policy is not None:
            self.token_policy.check(self.info)
        _check_sinks(self.token_policy, self.info)
        param = next(model.parameters())
        if self.channel is not None:
            self.channel.bind(self.info, param.device, param.dtype)
        super().__init__(layers=[self._make_layer(i) for i in range(self.info.num_layers)])
        self._token = next(_TOKENS)
        self._attached = False
        self._last_layer: int | None = None
        if self.policies:
            self._attach()
            weakref.finalize(self, _release, weakref.ref(model), self._token)

    def _attach(self) -> None:
        switch.acquire(self._model, self._token)
        self._attached = True

    def _make_layer(self, layer_idx: int) -> CacheLayerMixin:
        window = self.info.sliding_window if self.info.is_sliding(layer_idx) else None
        if not self.policies:
            return DynamicSlidingWindowLayer(sliding_window=window) if window else DynamicLayer()
        return CompressedLayer(
            layer_idx, self.info.num_kv_heads, self.info.head_dim, self.token_policy, self.channel, window
        )

    def detach(self) -> None:
        """Release the model's attention: it returns to its own once no live cache needs the switch.

        Optional: the cache also releases it when it is garbage-collected. Using the cache again
        after ``detach`` re-attaches it.
        """
        if self._attached:
            switch.release(self._model, self._token)
            self._attached = False

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new tokens (see :meth:`CompressedLayer.update`).

        Re-attaches a detached cache, and finalizes the layer updated before this one, so that a
        chunk which overfilled that layer's budget is evicted before this layer stores its own.
        """
        if self.policies and not self._attached:
            self._attach()
        previous, self._last_layer = self._last_layer, layer_idx
        if previous is not None and previous != layer_idx and isinstance(self.layers[previous], CompressedLayer):
            self.layers[previous].finalize()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def finalize(self) -> None:
        """Fold every layer's pending attention results in (and evict overfilled chunks); reports call it."""
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                layer.finalize()

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed a prompt through the model in chunks of ``prefill_chunk``, evicting between chunks.

        Parameters
        ----------
        input_ids : torch.Tensor
            ``(batch, prompt)`` token ids (left-padded for batches).
        attention_mask : torch.Tensor, optional
            ``(batch, prompt)`` 1 for tokens, 0 for padding, covering only ``input_ids``: the cache
            keeps what it needs of earlier padding itself.

        Returns
        -------
        torch.Tensor
            Logits of the last prompt token, ``(batch, vocab)``.

        """
        total = input_ids.shape[1]
        if total == 0:
            raise ValueError("prefill needs at least one token")
        chunk = self.prefill_chunk or total
        offset = self.get_seq_length()
        positions = None
        if attention_mask is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0) + self._real_tokens_seen()
        logits = None
        with torch.no_grad():
            for lo in range(0, total, chunk):
                hi = min(lo + chunk, total)
                kwargs: dict[str, Any] = {}
                if attention_mask is not None:
                    ones = attention_mask.new_ones(attention_mask.shape[0], offset)
                    kwargs["attention_mask"] = torch.cat([ones, attention_mask[:, :hi]], dim=1)
                    kwargs["position_ids"] = positions[:, lo:hi]
                out = self._model(input_ids[:, lo:hi], **cache_kwargs(self._model, self), use_cache=True,
                                  logits_to_keep=1, **kwargs)
                logits = out.logits[:, -1]
        return logits

    def _real_tokens_seen(self) -> torch.Tensor | int:
        layer = self.layers[0]
        if isinstance(layer, CompressedLayer) and layer.is_initialized:
            layer.finalize()
            return (layer.seen - layer.start[:, 0]).long()
        return self.get_seq_length()

    # --------------------------------------------------------------- accounting
    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds now: keys, values, slot metadata, projection matrices."""
        return self.memory_report().total

    def dense_nbytes(self) -> int:
        """Bytes a ``DynamicCache`` would hold after the same tokens (sliding layers keep their window)."""
        return self.memory_report().dense

    def memory_report(self) -> MemoryReport:
        """Per-layer, per-kind bytes held and what ``DynamicCache`` would hold (pending results folded in first)."""
        self.finalize()
        rows = []
        for i, layer in enumerate(self.layers):
            window = self.info.sliding_window if self.info.is_sliding(i) else None
            if not layer.is_initialized:
                rows.append(MemoryRow(i, "empty", 0, 0, 0, 0, 0, 0))
                continue
            batch, heads, slots, _ = layer.keys.shape
            elem = layer.values.element_size()
            dense = batch * heads * dense_layer_tokens(self.get_seq_length(i), window) * 2 * self.info.head_dim * elem
            if isinstance(layer, CompressedLayer):
                kind = "sliding" if window else "compressed"
                keys = layer.keys.nbytes + (layer.residual.nbytes if layer.residual is not None else 0)
                meta = layer.nbytes() - keys - layer.values.nbytes
                rows.append(MemoryRow(i, kind, slots, layer.held_tokens(), keys, layer.values.nbytes, meta, dense))
            else:
                rows.append(MemoryRow(i, "dense", slots, batch * heads * slots, layer.keys.nbytes,
                                      layer.values.nbytes, 0, dense))
        policy_bytes = self.channel.nbytes() if self.channel is not None else 0
        return MemoryReport(tuple(rows), policy_bytes, self.get_seq_length())


def _split_policies(policies: Sequence[Any]) -> tuple[TokenPolicy | None, ChannelPolicy | None]:
    tokens = [p for p in policies if isinstance(p, TokenPolicy)]
    channels = [p for p in policies if isinstance(p, ChannelPolicy)]
    others = [p for p in policies if not isinstance(p, TokenPolicy | ChannelPolicy)]
    if others:
        raise ValueError(
            f"not a policy: {others[0]!r}; pass TokenPolicy/ChannelPolicy objects (see kvpress_aqua.policies)"
        )
    if len(tokens) > 1 or len(channels) > 1:
        raise ValueError(
            f"give at most one token policy and one channel policy, got {len(tokens)} and {len(channels)}: "
            f"{', '.join(type(p).__name__ for p in policies)}"
        )
    return (tokens[0] if tokens else None), (channels[0] if channels else None)


def _check_sinks(policy: TokenPolicy | None, info: ModelInfo) -> None:
    sinks = getattr(policy, "sinks", 0) or 0
    window = info.sliding_window
    if window is not None and any(info.is_sliding(i) for i in range(info.num_layers)) and sinks > window - 1:
        raise ValueError(
            f"{type(policy).__name__}(sinks={sinks}) cannot fit in the model's sliding-window layers, which hold "
            f"at most {window - 1} past tokens; use sinks <= {window - 1}"
        )


def _release(model_ref: weakref.ref, token: int) -> None:
    """A collected cache's release of its model's attention (if the model still exists)."""
    model = model_ref()
    if model is not None:
        switch.release(model, token)

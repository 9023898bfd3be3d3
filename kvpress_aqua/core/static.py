"""Static decoding for a compressed layer: one buffer size, every write in place, nothing left for a later fold.

After :meth:`StaticDecoding.make_static` a decode step is a fixed sequence of tensor operations on
buffers that keep their addresses (the seen count is a device tensor, eviction overwrites the
lowest-ranked slot, the attention call folds its mass into the score buffer, a retrieval tier is
written at the seen index and read by the step's choice), so ``torch.compile``
captures the whole step and ``mode="reduce-overhead"`` replays it as a CUDA graph
(:mod:`kvpress_aqua.evaluation.static_decode`).
"""

from __future__ import annotations

import torch

from ..attention import dispatch
from .exact import ExactRows

__all__ = ["StaticDecoding"]


class StaticDecoding:
    """The static decode step of :class:`~kvpress_aqua.core.layer.CompressedLayer` (a mixin)."""

    def make_static(self, new_tokens: int) -> None:
        """Switch to static decoding: a buffer that never changes shape, every write in place.

        The buffer is sized once for ``new_tokens`` more tokens (``budget + 1`` slots at most), the
        count of tokens seen becomes a device tensor and each decode step overwrites the
        lowest-ranked slot (empty slots first) and folds its attention mass in place, so a whole
        step is a fixed sequence of tensor operations: what ``torch.compile`` and CUDA graphs need.
        A retrieval tier gets exactly ``new_tokens`` more rows: a later step fails with an index
        error (on CUDA, a device-side assert) before it changes the layer.
        """
        if not self.is_initialized:
            raise ValueError("make_static needs the prompt first: prefill the cache, then make it static")
        if self.chooses:
            raise ValueError(f"{type(self.token_policy).__name__} summarizes blocks as they fill, which changes the "
                             "buffer's shape: decode it with the growing cache (model.generate), not a static one")
        self.finalize()
        store = self.slots
        if store.used < store.capacity:
            store.keep_first(store.used)
        wanted = store.used + new_tokens
        capacity = wanted if self.budget is None else min(self.budget + 1, wanted)
        if capacity > store.capacity:
            store.grow(capacity)
        self.seen = torch.tensor(int(self.seen), dtype=torch.int64, device=store.keys.device)
        if self.exact is not None:  # the row of the token decoded last, stored at the next step (as a fold would)
            self.stash = ExactRows(0, 1)
            self.stash.allocate(self.exact.keys, store.keys.shape[0], self.num_kv_heads, self.exact.keys.shape[-1])
        store.mark_static()
        if self.tier is not None:  # every step's rows allocated now, read and written in place
            self.tier.make_static(new_tokens)
        for tensor in (self.seen, self.left_pad, *(t for rows in (self.exact, self.stash) if rows is not None
                                                   for t in rows.tensors().values())):
            torch._dynamo.mark_static_address(tensor)
        self.static = True

    def _static_step(self, stored: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One static decode step: overwrite the lowest-ranked slot, hand off, fold the mass in the attention."""
        if key_states.shape[-2] != 1:
            raise ValueError("a static cache decodes one token per step; make a new cache for another prompt")
        store, first = self.slots, self.seen.clone()
        if self.exact is not None:  # the previous token's row first, as the fold of a growing cache does
            self.exact.store_one(self.stash.keys, self.stash.slot, first - 1, self.left_pad[:, 0].long())
        if self.tier is not None:
            self._to_tier(stored, key_states, value_states)
        victim = self._priority().argmin(dim=-1, keepdim=True)  # empty slots rank lowest: filled first
        store.overwrite(victim, stored, value_states, first)
        if self.exact is not None:
            self.exact.blank(victim)
            self.stash.keys.copy_(self.channel_policy.residual_keys(self.layer_idx, key_states))
            self.stash.slot.copy_(victim)
        self.seen.add_(1)
        inputs = self._attention_inputs(store.capacity, store.valid.scatter(2, victim, False), key_states,
                                        value_states, first)
        if store.score is not None:
            inputs.score_out, inputs.new_slots = store.score, victim
            inputs.score_decay = self.token_policy.score_decay
        dispatch.hand_off(inputs)
        return self.keys, self.values

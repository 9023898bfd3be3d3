"""The part of a compressed layer that only answers ``transformers``: lengths, mask sizes, row operations, bytes.

``transformers`` asks a cache layer for the tokens it has seen (positions come from it), the mask
sizes of the next chunk, and to reorder, repeat or select sequences (beam search,
``num_return_sequences``); :class:`LayerContract` answers from the layer's tensors, whatever the
layer decided to keep. The deciding half is :class:`~kvpress_aqua.core.layer.CompressedLayer`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from .exact import ExactRows
from .slots import SlotStore
from .tier import RetrievalTier

__all__ = ["LayerContract"]


class LayerContract(CacheLayerMixin):
    """``transformers``' layer interface over a compressed layer's storage (``slots``, ``exact``, ``stash``)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    slots: SlotStore
    exact: ExactRows | None
    stash: ExactRows | None
    tier: RetrievalTier | None
    seen: int | torch.Tensor
    left_pad: torch.Tensor | None

    def finalize(self) -> None:  # noqa: B027 - the compressing layer folds its pending results here
        """Fold pending attention results in (see :meth:`CompressedLayer.finalize`)."""

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the layer holds, by name (what :meth:`nbytes` counts)."""
        if not self.is_initialized:
            return {}
        exact = {}
        if self.exact is not None:
            exact = self.exact.tensors()
            if self.stash is not None:
                exact.update({f"stash_{k}": v for k, v in self.stash.tensors().items()})
        tier = self.tier.device_tensors() if self.tier is not None else {}
        return {**self.slots.tensors(), **exact, **tier, "left_pad": self.left_pad}

    def get_seq_length(self) -> int:
        """Tokens seen (not held): ``generate`` derives positions from it."""
        return int(self.seen)

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        """Announce a key axis of just the new chunk, placed right after the tokens seen.

        ``query_length`` is an int since transformers 5.4 and a ``cache_position`` tensor before.
        """
        n = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return n, int(self.seen)

    def get_max_length(self) -> int:
        """No fixed maximum of tokens seen."""
        return -1

    get_max_cache_shape = get_max_length

    def reset(self) -> None:
        """Drop every token; the layer starts empty."""
        self.slots = SlotStore()
        if self.exact is not None:
            self.exact = ExactRows(self.exact.sinks, self.exact.recent)
        self.stash = None
        if self.tier is not None:
            self.tier = RetrievalTier(self.tier.top_k, self.tier.offload, self.tier.int8)
        self.left_pad = None
        self.seen, self.static = 0, False
        self._pending = self._pending_slots = None
        self.is_initialized = False

    def _apply_rows(self, fn: Any) -> None:
        """Apply a per-sequence operation (reorder, repeat, select) to every tensor the layer holds."""
        if not self.is_initialized:
            return
        self.finalize()  # the pending attention results are per row too
        for name in SlotStore.NAMES:
            tensor = getattr(self.slots, name)
            if tensor is not None:
                setattr(self.slots, name, fn(tensor))
        for rows in (self.exact, self.stash):
            if rows is not None:
                rows.keys, rows.slot = fn(rows.keys), fn(rows.slot)
        if self.tier is not None:
            self.tier.apply_rows(fn)
        self.left_pad = fn(self.left_pad)

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

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds, metadata included."""
        return sum(t.nbytes for t in self._tensors().values())

    def host_nbytes(self) -> int:
        """Bytes this layer keeps off the accelerator (a retrieval tier's offloaded rows)."""
        if self.tier is None or not self.is_initialized:
            return 0
        return sum(t.nbytes for t in self.tier.host_tensors().values())

    def held_tokens(self) -> int:
        """Valid tokens held, summed over sequences and KV heads."""
        return int(self.valid.sum()) if self.is_initialized else 0

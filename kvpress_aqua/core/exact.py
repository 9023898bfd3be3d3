"""AQUA's exact tokens of one layer: the key channels pruning drops, kept for a few tokens, and where they are.

A channel policy that prunes keys may ask the layer to keep the dropped channels of the first
``sinks`` real tokens of each sequence and of the ``recent`` latest tokens (see
:class:`~kvpress_aqua.policies.base.ChannelPolicy`). :class:`ExactRows` holds them: row ``i < sinks``
stands for the sequence's ``i``-th real token, row ``sinks + t % recent`` for token ``t`` while it
is among the latest ``recent`` (a ring). Each row knows the slot its token occupies; the attention
adds ``queries·row`` to that slot's score, which makes attention to it exact again.

A row that stands for no held token (not written yet, padding, evicted, or a recent token that is
also a sink and is read from its sink row) is all zeros with slot ``-1``. A decode step writes only
the new token's row (one scatter): a ring row that a sink skipped keeps its older token, still held
exactly where it points, so no token is ever counted twice.
"""

from __future__ import annotations

import torch

__all__ = ["ExactRows"]


class ExactRows:
    """The exact-token rows of one layer, ``(batch, kv_heads, sinks + recent, ...)``.

    Parameters
    ----------
    sinks, recent : int
        Rows for the first real tokens and the ring of the latest tokens.

    Attributes
    ----------
    keys : torch.Tensor
        ``(batch, kv_heads, rows, head_dim - key_dim)``: the dropped key channels of each row's token.
    slot : torch.Tensor
        int64 ``(batch, kv_heads, rows)``: the slot each row's token occupies, ``-1`` for no token.

    """

    def __init__(self, sinks: int, recent: int) -> None:
        self.sinks, self.recent = sinks, recent
        self.keys: torch.Tensor | None = None
        self.slot: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        """``sinks + recent``."""
        return self.sinks + self.recent

    def allocate(self, like: torch.Tensor, batch: int, heads: int, width: int) -> None:
        """Empty rows (zeros, slot -1) in the dtype and on the device of ``like``."""
        self.keys = like.new_zeros(batch, heads, self.rows, width)
        self.slot = torch.full((batch, heads, self.rows), -1, dtype=torch.int64, device=like.device)

    def store(self, dropped: torch.Tensor, new_slots: torch.Tensor, new_valid: torch.Tensor,
              before: int | torch.Tensor, left_pad: torch.Tensor) -> None:
        """Write the rows of a chunk's sink tokens and of its last ``recent`` tokens.

        Parameters
        ----------
        dropped : torch.Tensor
            ``(batch, kv_heads, n, width)``: the chunk's dropped key channels.
        new_slots : torch.Tensor
            int64 ``(batch, kv_heads, n)``: the slots the chunk was written to.
        new_valid : torch.Tensor
            bool ``(batch, n)``: False for padding tokens.
        before : int or torch.Tensor
            Cache index of the chunk's first token (a 0-d tensor in a static decode step).
        left_pad : torch.Tensor
            int ``(batch, 1)``: left-padding tokens of each row, this chunk's included.

        """
        sinks, recent = self.sinks, self.recent
        batch, heads, n, width = dropped.shape
        if n == 1 and recent:
            self.store_one(dropped, new_slots.where(new_valid[:, None, :], -1), before, left_pad)
            return
        if recent:
            m = min(n, recent)
            index = torch.arange(before + n - m, before + n, device=dropped.device)
            rows = sinks + index % recent
            plain = (new_valid[:, n - m:] & (index - left_pad >= sinks))[:, None, :]  # index - left_pad: position
            self.keys.index_copy_(2, rows, dropped[:, :, n - m:] * plain[..., None])
            self.slot.index_copy_(2, rows, new_slots[:, :, n - m:].where(plain, -1))
        if sinks:
            # the token at real position p has cache index p + left_pad; after left padding it is valid
            offset = torch.arange(sinks, device=dropped.device) + left_pad - before  # (batch, sinks)
            here = ((offset >= 0) & (offset < n))[:, None, :]
            at = offset.clamp(0, n - 1)[:, None, :].expand(batch, heads, sinks)
            taken = dropped.gather(2, at[..., None].expand(batch, heads, sinks, width))
            self.keys[:, :, :sinks] = torch.where(here[..., None], taken, self.keys[:, :, :sinks])
            self.slot[:, :, :sinks] = torch.where(here, new_slots.gather(2, at), self.slot[:, :, :sinks])

    def store_one(self, dropped: torch.Tensor, slot: torch.Tensor, before: int | torch.Tensor,
                  left_pad: torch.Tensor) -> None:
        """Write one decoded token's row (one scatter): its sink row if it is a sink, else its ring row.

        ``dropped`` is ``(batch, kv_heads, 1, width)`` and ``slot`` ``(batch, kv_heads, 1)``; where
        ``slot`` is -1 (no token: padding, or nothing stashed yet) the row keeps what it held. A
        padding token (position ``before - left_pad < 0``) is no sink: it is pointed at its ring row,
        which it leaves as it was (only padding came before it, so that row holds no token).
        """
        position = before - left_pad  # (batch, 1); negative for a padding token (left_pad counts it)
        sink = (position >= 0) & (position < self.sinks)
        rows = torch.where(sink, position, self.sinks + before % self.recent)[:, None, :].expand_as(slot)
        keep = (slot < 0)[..., None]
        at = rows[..., None].expand_as(dropped)
        self.keys.scatter_(2, at, torch.where(keep, self.keys.gather(2, at), dropped))
        self.slot.scatter_(2, rows, torch.where(slot < 0, self.slot.gather(2, rows), slot))

    def follow(self, kept: torch.Tensor, slots: int) -> None:
        """The layer kept only ``kept`` ``(batch, kv_heads, k)`` of its ``slots`` slots: move the rows' slots along.

        A row whose token was evicted goes blank.
        """
        place = torch.full((*kept.shape[:2], slots), -1, dtype=torch.int64, device=kept.device)
        place.scatter_(2, kept, torch.arange(kept.shape[-1], device=kept.device).expand_as(kept))
        moved = place.gather(2, self.slot.clamp_min(0)).where(self.slot >= 0, -1)
        self.keys.masked_fill_((moved < 0)[..., None], 0.0)
        self.slot = moved

    def blank(self, victim: torch.Tensor) -> None:
        """The layer overwrote slot ``victim`` ``(batch, kv_heads, 1)``: the rows of the token it held go blank."""
        gone = self.slot == victim
        self.keys.masked_fill_(gone[..., None], 0.0)
        self.slot.masked_fill_(gone, -1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"exact_keys": keys, "exact_slot": slot}`` once allocated (for accounting and row operations)."""
        return {} if self.keys is None else {"exact_keys": self.keys, "exact_slot": self.slot}

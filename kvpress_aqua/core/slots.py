"""The per-slot tensors of one compressed layer and the few ways they change.

Every tensor is ``(batch, kv_heads, slots, ...)``; :mod:`kvpress_aqua.core.accounting` gives their
byte costs. Slots ``[0, used)`` hold tokens (valid or not); slots ``[used, capacity)`` are the
empty tail of a grown decode buffer (invalid, index -1), filled in place by later decode steps.
The store only moves tensors: which slots to keep or overwrite is the layer's decision.
"""

from __future__ import annotations

import torch

__all__ = ["SlotStore"]


class SlotStore:
    """Keys (stored form), values and per-slot metadata of one layer.

    Attributes
    ----------
    keys : torch.Tensor
        ``(batch, kv_heads, slots, key_dim)``: keys as the channel policy stores them.
    values : torch.Tensor
        ``(batch, kv_heads, slots, value_dim)``.
    index : torch.Tensor
        int32 ``(batch, kv_heads, slots)``: cache index of each slot's token (-1: empty).
    valid : torch.Tensor
        bool ``(batch, kv_heads, slots)``: False for empty slots and padding.
    score : torch.Tensor or None
        float32 ``(batch, kv_heads, slots)``: attention mass received (score-based policies only).
    log_weight : torch.Tensor or None
        float32 ``(batch, kv_heads, slots)``: how many tokens each slot stands for, as a log (the
        attention adds it to the slot's score); 0 for a token that stands for itself. Only for
        policies that keep weighted summaries (BalanceKV, uniform sampling).
    used : int
        Slots that hold a token; the rest of the buffer is empty.

    """

    NAMES = ("keys", "values", "index", "valid", "score", "log_weight")

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.index: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.score: torch.Tensor | None = None
        self.log_weight: torch.Tensor | None = None
        self.used = 0

    @property
    def capacity(self) -> int:
        """Slots allocated."""
        return self.keys.shape[-2]

    def allocate(self, like: torch.Tensor, heads: int, key_dim: int, value_dim: int, scores: bool,
                 weights: bool = False) -> None:
        """Empty ``(batch, heads, 0, ...)`` tensors in the dtype and on the device of ``like``."""
        batch, dev = like.shape[0], like.device
        self.keys = like.new_empty(batch, heads, 0, key_dim)
        self.values = like.new_empty(batch, heads, 0, value_dim)
        self.index = torch.empty(batch, heads, 0, dtype=torch.int32, device=dev)
        self.valid = torch.empty(batch, heads, 0, dtype=torch.bool, device=dev)
        self.score = torch.empty(batch, heads, 0, dtype=torch.float32, device=dev) if scores else None
        self.log_weight = torch.empty(batch, heads, 0, dtype=torch.float32, device=dev) if weights else None
        self.used = 0

    def tensors(self) -> dict[str, torch.Tensor]:
        """The allocated tensors by name."""
        return {name: getattr(self, name) for name in self.NAMES if getattr(self, name) is not None}

    def _meta(self, first_index: int | torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads = self.index.shape[:2]
        index = (first_index + torch.arange(n, device=self.index.device)).to(torch.int32)
        return index.expand(batch, heads, n), self.valid.new_ones(batch, heads, n)

    def append(self, keys: torch.Tensor, values: torch.Tensor, first_index: int) -> torch.Tensor:
        """Store ``n`` tokens after the held slots (new, larger tensors); returns their slots ``(B, H, n)``."""
        batch, heads, n, _ = keys.shape
        first = self.capacity
        index, valid = self._meta(first_index, n)
        self.keys = torch.cat([self.keys, keys], dim=-2)
        self.values = torch.cat([self.values, values], dim=-2)
        self.index = torch.cat([self.index, index], dim=-1)
        self.valid = torch.cat([self.valid, valid], dim=-1)
        for name in ("score", "log_weight"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, torch.cat([tensor, tensor.new_zeros(batch, heads, n)], dim=-1))
        self.used = first + n
        return torch.arange(first, first + n, device=keys.device).expand(batch, heads, n)

    def write_next(self, keys: torch.Tensor, values: torch.Tensor, token_index: int) -> torch.Tensor:
        """Store one token in place in the first empty slot; returns its slot ``(B, H, 1)``."""
        slot = self.used
        index, valid = self._meta(token_index, 1)
        self.keys[:, :, slot:slot + 1] = keys
        self.values[:, :, slot:slot + 1] = values
        self.index[..., slot:slot + 1] = index
        self.valid[..., slot:slot + 1] = valid
        if self.log_weight is not None:
            self.log_weight[..., slot:slot + 1] = 0.0
        self.used += 1
        batch, heads = keys.shape[:2]
        return torch.full((batch, heads, 1), slot, dtype=torch.int64, device=keys.device)

    def overwrite(
        self, victim: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, token_index: int | torch.Tensor
    ) -> None:
        """Store one token in place over slot ``victim`` ``(B, H, 1)`` of each row (static shapes).

        The writes are indexed assignments (``index_put_``), which ``torch.compile`` keeps in place;
        a ``scatter_`` into the buffer made it copy the whole buffer at every step.
        """
        batch, heads = victim.shape[:2]
        at = (torch.arange(batch, device=victim.device)[:, None], torch.arange(heads, device=victim.device),
              victim[..., 0])
        index, valid = self._meta(token_index, 1)
        self.keys[at] = keys[:, :, 0]
        self.values[at] = values[:, :, 0]
        self.index[at] = index[..., 0]
        self.valid[at] = valid[..., 0]
        for tensor in (self.score, self.log_weight):
            if tensor is not None:
                tensor[at] = 0.0

    def keep(self, slots: torch.Tensor) -> None:
        """Keep only ``slots`` ``(B, H, k)`` of each row, in that order; the result is new, compact tensors."""
        for name in self.NAMES:
            tensor = getattr(self, name)
            if tensor is not None:
                at = slots if tensor.ndim == 3 else slots[..., None].expand(-1, -1, -1, tensor.shape[-1])
                setattr(self, name, tensor.gather(2, at))
        self.used = slots.shape[-1]

    def keep_first(self, slots: int) -> None:
        """Keep the first ``slots`` slots (new, compact tensors): drops the empty tail of a grown buffer."""
        for name in self.NAMES:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor[:, :, :slots].clone())

    def mark_static(self) -> None:
        """Tell ``torch.compile`` that the tensors keep their addresses (they are written in place from now on)."""
        for tensor in self.tensors().values():
            torch._dynamo.mark_static_address(tensor)

    def grow(self, total: int) -> None:
        """Append empty slots (invalid, index -1) up to ``total``."""
        batch, heads, slots, _ = self.keys.shape
        extra = total - slots
        self.keys = torch.cat([self.keys, self.keys.new_zeros(batch, heads, extra, self.keys.shape[-1])], dim=2)
        self.values = torch.cat([self.values, self.values.new_zeros(batch, heads, extra, self.values.shape[-1])], 2)
        self.index = torch.cat([self.index, self.index.new_full((batch, heads, extra), -1)], dim=-1)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(batch, heads, extra)], dim=-1)
        for name in ("score", "log_weight"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, torch.cat([tensor, tensor.new_zeros(batch, heads, extra)], dim=-1))

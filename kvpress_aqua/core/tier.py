"""The second tier of a retrieval layer: every token's keys and values, their proxy keys and the working set.

A layer whose token policy retrieves (:class:`~kvpress_aqua.policies.retrieval.Retrieval`) keeps
its held slots (sinks and recent tokens) as any layer does, and also writes every token it sees
into a :class:`RetrievalTier`:

- on the tier's device (pinned host memory, locked to its exact size, when the policy offloads and
  the model is on a GPU; on a CPU-only machine a separate store on the same device, accounted
  apart): the keys in their stored form (pruned under AQUA) and the values, row ``t`` for cache
  index ``t``;
- on the accelerator: the proxy key of every token, its validity, and the working set (the rows
  the last decode step retrieved, with their token indices), so that the next step copies only
  the rows it does not already hold.

The tier only moves tensors; which rows a step reads is decided by the attention call
(:func:`kvpress_aqua.ops.retrieval.retrieve`) from the proxy scores.

A static tier (:meth:`RetrievalTier.make_static`, for compiled decoding) has its rows allocated
for every step to come and keeps no working set: each step reads its selected rows straight from
the tier, an offloaded one included, through a device view of its pinned host memory (a GPU reads
mapped host memory over PCIe), so a step is a fixed sequence of device operations that a CUDA
graph can replay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..ops.inputs import RetrievalInputs
from ..util.pinned import pinned_copy, pinned_zeros
from .accounting import grown

__all__ = ["RetrievalTier"]


class RetrievalTier:
    """Every token of one layer, in a second tier, with its proxy keys and the working set.

    Parameters
    ----------
    top_k : int
        Rows retrieved per sequence and KV head at each decode step (the working set's size).
    offload : bool
        Keep the full keys and values off the accelerator (host memory when the model is on a GPU).
    int8 : bool
        Store the proxy keys as int8 with a float32 scale per token (symmetric, by the row's largest
        magnitude) instead of in the model dtype.

    Attributes
    ----------
    keys, values : torch.Tensor
        ``(batch, kv_heads, capacity, key_dim)`` stored keys and ``(..., value_dim)`` values, on the tier's device.
    valid : torch.Tensor
        bool ``(batch, kv_heads, capacity)`` on the accelerator.
    proxy : torch.Tensor
        ``(batch, kv_heads, capacity, rank)`` proxy keys on the accelerator (int8 when quantized).
    proxy_scale : torch.Tensor or None
        float32 ``(batch, kv_heads, capacity)``: each int8 proxy key's scale (quantized only).
    basis : torch.Tensor or None
        The proxy basis, ``(kv_heads, head_dim, rank)`` (the policy's, not counted here) or
        ``(batch, kv_heads, head_dim, rank)`` (fit on this prompt, counted here).
    ws_index, ws_keys, ws_values : torch.Tensor or None
        The working set: int64 ``(batch, kv_heads, k)`` token indices (ascending, -1: none) and their rows.
    used : int
        Tokens written (rows ``[0, used)``).
    steps, hits, fetched, retrieved, chunk_fetched : int
        Decode steps served, rows they found in the working set, rows they copied from the tier and
        rows they retrieved (the hit rate is ``hits / retrieved``); rows copied for chunks. A static
        tier's steps (counted on the device, read here) read every retrieved row from the tier:
        rows fetched, none hit.

    """

    def __init__(self, top_k: int, offload: bool, int8: bool = False) -> None:
        self.top_k, self.offload, self.int8 = top_k, offload, int8
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.proxy: torch.Tensor | None = None
        self.proxy_scale: torch.Tensor | None = None
        self.basis: torch.Tensor | None = None
        self.ws_index: torch.Tensor | None = None
        self.ws_keys: torch.Tensor | None = None
        self.ws_values: torch.Tensor | None = None
        self.used = 0
        self._steps = self.hits = self._fetched = self._retrieved = self.chunk_fetched = 0
        self.static = False
        # device views of pinned rows (an offloaded tier on a GPU), made with the rows; a static
        # tier's rows themselves otherwise
        self.key_view: torch.Tensor | None = None
        self.value_view: torch.Tensor | None = None
        self.static_counts: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        """Rows allocated."""
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def pinned(self) -> bool:
        """Whether the tier sits in pinned host memory (an offloaded tier of a model on a GPU)."""
        return self.offload and self.proxy is not None and self.proxy.is_cuda

    def allocate(self, like: torch.Tensor, heads: int, key_dim: int, value_dim: int, rank: int) -> None:
        """Empty tensors for a batch like ``like`` (the first new keys): tier rows on the host when offloaded."""
        batch, dev = like.shape[0], like.device
        self.proxy = like.new_empty(batch, heads, 0, rank, dtype=torch.int8 if self.int8 else like.dtype)
        self.proxy_scale = torch.empty(batch, heads, 0, device=dev) if self.int8 else None
        self.valid = torch.empty(batch, heads, 0, dtype=torch.bool, device=dev)
        tier_dev = torch.device("cpu") if self.offload else dev
        self.keys = torch.empty(batch, heads, 0, key_dim, dtype=like.dtype, device=tier_dev)
        self.values = torch.empty(batch, heads, 0, value_dim, dtype=like.dtype, device=tier_dev)
        self.used = 0
        self._map()

    def _grow(self, needed: int, step: bool) -> None:
        """Room for ``needed`` rows: exactly that for a chunk, in steps of 1/16 (at least 16) for a decode step."""
        capacity = self.capacity
        if needed <= capacity:
            return
        total = max(needed, grown(capacity)) if step else needed
        for name in ("keys", "values", "valid", "proxy", "proxy_scale"):
            old = getattr(self, name)
            if old is None:
                continue
            shape = (*old.shape[:2], total, *old.shape[3:])
            if self.pinned and name in ("keys", "values"):
                new = pinned_zeros(shape, old.dtype)
            else:
                new = torch.zeros(shape, dtype=old.dtype, device=old.device)
            new[:, :, :self.used] = old[:, :, :self.used]
            setattr(self, name, new)
        self._map()

    def _map(self) -> None:
        """Device views of new pinned rows (:func:`_device_view`): the accelerator reads them in place."""
        if not self.pinned:
            return
        device = self.valid.device
        self.key_view, self.value_view = ((_device_view(self.keys, device), _device_view(self.values, device))
                                          if self.keys.numel() else (None, None))

    def append(self, keys: torch.Tensor, values: torch.Tensor, proxy: torch.Tensor) -> None:
        """Write ``n`` new tokens (rows ``used .. used + n``): stored keys, values, proxy keys; valid until folded."""
        n = keys.shape[-2]
        self._grow(self.used + n, step=n == 1)
        at = slice(self.used, self.used + n)
        self.keys[:, :, at] = keys.to(self.keys.device)  # to the host: a blocking copy (the host reads it next)
        self.values[:, :, at] = values.to(self.values.device)
        self._write_proxy(at, proxy)
        self.valid[:, :, at] = True
        self.used += n

    def fit(self, basis: torch.Tensor, keys: torch.Tensor, first: int) -> None:
        """Adopt a per-prompt proxy basis fit on the first call's keys ``(B, H_kv, n, d)`` and write their proxies."""
        self.basis = basis
        self._write_proxy(slice(first, first + keys.shape[-2]), keys @ basis)

    def _write_proxy(self, at: slice, proxy: torch.Tensor) -> None:
        if not self.int8:
            self.proxy[:, :, at] = proxy
            return
        self.proxy[:, :, at], self.proxy_scale[:, :, at] = _quantized(proxy)

    def make_static(self, new_tokens: int) -> None:
        """Fix the tier for ``new_tokens`` more decode steps: rows allocated now, no working set, counts on the device.

        Every later write is in place (:meth:`write`); an offloaded tier on a GPU is read and written
        through a device view of its pinned memory.
        """
        self._grow(self.used + new_tokens, step=False)
        self.ws_index = self.ws_keys = self.ws_values = None
        device = self.valid.device
        if not self.pinned:  # a pinned tier's views were made with its rows
            self.key_view, self.value_view = self.keys, self.values
        self.static_counts = torch.zeros(2, dtype=torch.int64, device=device)  # decode steps, rows read
        for tensor in (self.key_view, self.value_view, self.valid, self.proxy, self.proxy_scale, self.static_counts):
            if tensor is not None:
                torch._dynamo.mark_static_address(tensor)
        self.static = True

    def write(self, at: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, proxy: torch.Tensor) -> None:
        """A static tier's write of one decoded token at cache index ``at`` (a 0-d device tensor), in place."""
        at = at.view(1)
        self.key_view.index_copy_(2, at, keys)
        self.value_view.index_copy_(2, at, values)
        if self.int8:
            quantized, scale = _quantized(proxy)
            self.proxy.index_copy_(2, at, quantized)
            self.proxy_scale.index_copy_(2, at, scale)
        else:
            self.proxy.index_copy_(2, at, proxy)
        self.valid.index_fill_(2, at, True)

    def inputs(self, held_index: torch.Tensor) -> RetrievalInputs:
        """What the attention call reads: the written rows (all rows of a static tier), the proxy, the working set."""
        if self.static:
            return RetrievalInputs(
                tier_keys=self.key_view, tier_values=self.value_view, tier_valid=self.valid, proxy_keys=self.proxy,
                proxy_basis=self.basis, proxy_scale=self.proxy_scale, held_index=held_index, top_k=self.top_k,
                counts=self.static_counts,
            )
        used = self.used
        mapped = {} if not self.pinned or self.key_view is None else dict(  # misses read on the accelerator
            mapped_keys=self.key_view[:, :, :used], mapped_values=self.value_view[:, :, :used])
        return RetrievalInputs(
            tier_keys=self.keys[:, :, :used], tier_values=self.values[:, :, :used],
            tier_valid=self.valid[..., :used], proxy_keys=self.proxy[:, :, :used], proxy_basis=self.basis,
            proxy_scale=None if self.proxy_scale is None else self.proxy_scale[..., :used],
            held_index=held_index, top_k=self.top_k,
            ws_index=self.ws_index, ws_keys=self.ws_keys, ws_values=self.ws_values, **mapped,
        )

    def fold(self, retrieval: RetrievalInputs, new_valid: torch.Tensor, first: int) -> None:
        """Record the attention call's results: padding among the new rows, the new working set, the counts."""
        n = new_valid.shape[-1]
        self.valid[:, :, first:first + n] &= new_valid[:, None, :]
        if retrieval.selected is None:
            self.chunk_fetched += retrieval.fetched
            return
        self._fetched += retrieval.fetched
        self.ws_index, self.ws_keys, self.ws_values = retrieval.selected, retrieval.sel_keys, retrieval.sel_values
        self._steps += 1
        self.hits += retrieval.hits
        self._retrieved += int((retrieval.selected >= 0).sum())

    def _static_totals(self) -> tuple[int, int]:
        return (0, 0) if self.static_counts is None else tuple(int(n) for n in self.static_counts.tolist())

    steps = property(lambda self: self._steps + self._static_totals()[0], doc="Decode steps served.")
    fetched = property(lambda self: self._fetched + self._static_totals()[1], doc="Rows copied or read from the tier.")
    retrieved = property(lambda self: self._retrieved + self._static_totals()[1], doc="Rows retrieved.")

    def row_nbytes(self) -> int:
        """Bytes of one row (one token's stored key and value for one KV head)."""
        return (self.keys.shape[-1] + self.values.shape[-1]) * self.keys.element_size()

    def device_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors on the accelerator, by name (the tier's rows too unless offloaded)."""
        named = {"tier_valid": self.valid, "proxy": self.proxy, "proxy_scale": self.proxy_scale,
                 "ws_index": self.ws_index,
                 "ws_keys": self.ws_keys, "ws_values": self.ws_values}
        if self.basis is not None and self.basis.ndim == 4:
            named["proxy_basis"] = self.basis
        if not self.offload:
            named.update(tier_keys=self.keys, tier_values=self.values)
        return {k: v for k, v in named.items() if v is not None}

    def host_tensors(self) -> dict[str, torch.Tensor]:
        """The offloaded tensors (the tier's rows), by name; empty unless offloaded."""
        if not self.offload or self.keys is None:
            return {}
        return {"tier_keys": self.keys, "tier_values": self.values}

    def apply_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a per-sequence operation (reorder, repeat, select) to every per-sequence tensor."""
        for name in ("keys", "values", "valid", "proxy", "proxy_scale", "ws_index", "ws_keys", "ws_values"):
            tensor = getattr(self, name)
            if tensor is not None:
                moved = fn(tensor)
                if self.pinned and name in ("keys", "values"):
                    moved = pinned_copy(moved)
                setattr(self, name, moved)
        self._map()
        if self.basis is not None and self.basis.ndim == 4:
            self.basis = fn(self.basis)


def _quantized(proxy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 rounding by each row's largest magnitude: ``(int8 proxy, float32 scale)``."""
    scale = proxy.float().abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return (proxy.float() / scale[..., None]).round_().to(torch.int8), scale


def _device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor on ``device`` over the pinned host memory of ``host`` (mapped: the GPU reads it over PCIe).

    Host memory locked by :func:`~kvpress_aqua.util.pinned.pinned_zeros` is mapped into the unified
    address space, so its host address is valid on the device; the view holds no reference: ``host``
    must outlive it.
    """
    span = host.untyped_storage().nbytes() - host.storage_offset() * host.element_size()
    storage = torch._C._construct_storage_from_data_pointer(host.data_ptr(), device, span)
    return torch.empty(0, dtype=host.dtype, device=device).set_(storage, 0, host.shape, host.stride())

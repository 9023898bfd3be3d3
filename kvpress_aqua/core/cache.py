"""The compressing cache: a ``transformers`` ``Cache`` of :class:`~kvpress_aqua.core.layer.CompressedLayer`.

:class:`CompressedCache` builds one layer per decoder layer, switches the model's attention to
the package's (shared by every live cache of that model, :mod:`kvpress_aqua.attention.switch`),
finalizes a layer when the next one updates (so that a chunk that overfilled a layer's budget is
evicted before the next layer stores its own: a prompt fed in one forward is held in full by one
layer at a time), and reports the bytes it holds (:class:`~kvpress_aqua.core.report.MemoryReport`).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from ..attention import switch
from ..model_info import ModelInfo
from ..policies.base import ChannelPolicy, TokenPolicy
from ..util.compat import cache_kwargs
from .accounting import dense_layer_tokens
from .layer import CompressedLayer
from .parallel import device_name, local_kv_heads
from .report import MemoryReport, MemoryRow

__all__ = ["CompressedCache"]

_TOKENS = itertools.count()


class CompressedCache(Cache):
    """A drop-in ``DynamicCache`` replacement that evicts tokens and prunes key channels.

    Parameters
    ----------
    model : PreTrainedModel
        The decoder the cache serves. Its attention implementation is switched to
        :func:`~kvpress_aqua.attention.compressed_attention` (registered through
        ``transformers.AttentionInterface``) when a policy needs it. Several caches may serve one
        model: the model gets its own attention back when the last of them is detached
        (:meth:`detach`, or the end of a ``with`` block on the cache) or garbage-collected, and a
        detached cache that is used again re-attaches. A cache stays alive while anything refers to
        it (``out.past_key_values`` of ``generate`` does): detach it before ``save_pretrained`` (the
        config would name this package's attention) or before timing the model's own attention.
    *policies : TokenPolicy or ChannelPolicy
        At most one of each kind, in any order. None at all gives a plain ``DynamicCache``.
    prefill_chunk : int, optional
        Chunk size used by :meth:`prefill` so that peak memory follows the budget, not the prompt.

    Attributes
    ----------
    info : ModelInfo
        The model's attention shapes (every KV head).
    kv_heads : range
        The KV heads this cache holds: all of them, or this rank's share under tensor parallelism
        (``tp_plan="auto"``; :mod:`kvpress_aqua.core.parallel`).

    Notes
    -----
    A model split over devices (``device_map="auto"``) works as it is: each layer's tensors, and the
    channel policy's tensors of that layer, live where that layer's keys first arrive. Under tensor
    parallelism each rank builds its own cache over the same policies; nothing is communicated
    (eviction is decided per KV head) and :meth:`nbytes` counts this rank's bytes
    (docs/multi-gpu.md).

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
        self.kv_heads = local_kv_heads(model, self.info.num_kv_heads)
        self.token_policy, self.channel_policy = _split_policies(policies)
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
        # where policy tensors wait for their layer's first update (a weight offloaded to disk is on "meta")
        self._home = param.device if param.device.type != "meta" else torch.device("cpu")
        channels = self.channel_policy
        if channels is not None:
            channels.bind(self.info, self._home, param.dtype, self.kv_heads)
        if self.token_policy is not None:
            key_dims = [channels.key_dim(i) if channels is not None else self.info.head_dim
                        for i in range(self.info.num_layers)]
            exact = channels.exact_sinks + channels.exact_recent if channels is not None else 0
            self.token_policy.prepare(self.info, self._home, param.dtype, key_dims, exact, self.kv_heads)
        super().__init__(layers=[self._make_layer(i) for i in range(self.info.num_layers)])
        self._token = next(_TOKENS)
        self._attached = False
        self._last_layer: int | None = None
        self._plain_pad: torch.Tensor | None = None  # a plain cache's left padding fed through prefill
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
        share = len(self.kv_heads) < self.info.num_kv_heads  # a tensor-parallel rank's heads
        return CompressedLayer(
            layer_idx, len(self.kv_heads), self.info.head_dim, self.token_policy, self.channel_policy, window,
            heads=self.kv_heads if share else None, num_heads=self.info.num_kv_heads if share else None,
        )

    def __enter__(self) -> CompressedCache:
        return self

    def __exit__(self, *exc: object) -> None:
        """Leaving a ``with CompressedCache(...) as cache:`` block detaches the cache (:meth:`detach`)."""
        self.detach()

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
        self._check_update(key_states, layer_idx)
        if self.policies and not self._attached:
            self._attach()
        if not self.layers[layer_idx].is_initialized:
            self._place(layer_idx, key_states.device)
        previous, self._last_layer = self._last_layer, layer_idx
        if previous is not None and previous != layer_idx and isinstance(self.layers[previous], CompressedLayer):
            self.layers[previous].finalize()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _place(self, layer_idx: int, device: torch.device) -> None:
        """Bind a layer's policy tensors to ``device``, where its first keys arrived (a model split over devices).

        Each policy moves that layer's tensors (:meth:`ChannelPolicy.place`, :meth:`TokenPolicy.place`):
        AQUA's bases, a calibrated retrieval proxy.
        """
        for policy in self.policies:
            policy.place(layer_idx, device)

    def _check_update(self, key_states: torch.Tensor, layer_idx: int) -> None:
        """Refuse a model this cache was not built for, and a batch size the plain path cannot grow into.

        The cache knows its model's layer count and head shape (:attr:`info`); a forward runs every
        layer in order, so layer 0 coming again before the last layer ran means that a model with
        fewer layers ran this cache (or a forward failed midway, leaving the layers out of step).
        """
        layers = len(self.layers)
        built_for = f"this cache was built for {self.info.name} ({layers} layers)"
        if not 0 <= layer_idx < layers:
            raise ValueError(f"layer {layer_idx}: {built_for}; build a new CompressedCache(model, ...) for the "
                             "model you run")
        previous = self._last_layer
        if layer_idx <= (previous if previous is not None else -1) and previous != layers - 1:
            raise ValueError(f"layer {layer_idx} after layer {previous}: {built_for}, but the last forward stopped "
                             f"after {previous + 1} layers (another model, or a forward that failed midway); build a "
                             "new CompressedCache(model, ...) for each model and after a failed forward")
        layer = self.layers[layer_idx]
        if isinstance(layer, CompressedLayer):
            return  # the layer checks its own shapes and batch
        shape = (len(self.kv_heads), self.info.head_dim)
        if key_states.ndim != 4 or (key_states.shape[1], key_states.shape[-1]) != shape:
            raise ValueError(f"layer {layer_idx}: expected keys of shape (batch, {shape[0]}, new, {shape[1]}), got "
                             f"{tuple(key_states.shape)}; {built_for}")
        if layer.is_initialized and key_states.shape[0] != layer.keys.shape[0]:
            raise ValueError(f"this cache holds {layer.keys.shape[0]} sequences but was given a batch of "
                             f"{key_states.shape[0]}; build a new CompressedCache for a different batch size")

    def reset(self) -> None:
        """Empty every layer (the cache is then like a new one for the same model and policies)."""
        for layer in self.layers:
            if not isinstance(layer, CompressedLayer):  # transformers 4's dynamic layers only zero their tensors
                layer.keys = layer.values = None
                layer.is_initialized = False
        super().reset()
        self._last_layer = None
        self._plain_pad = None

    @property
    def can_make_static(self) -> bool:
        """Whether :meth:`make_static` accepts this cache: it has a policy, and no policy summarizes blocks."""
        return bool(self.policies) and not any(isinstance(layer, CompressedLayer) and layer.chooses
                                               for layer in self.layers)

    def make_static(self, new_tokens: int) -> None:
        """Make every layer static for ``new_tokens`` decode steps (see :meth:`CompressedLayer.make_static`).

        After this the cache decodes one token per call with no change of shape and no host
        synchronisation, so that a compiled decode step (``torch.compile(mode="reduce-overhead")``)
        captures it in a CUDA graph: :func:`kvpress_aqua.evaluation.static_decode.generate_static`.
        Every tensor the step reads in place is marked as keeping its address (the layers' buffers and
        the policies' own tensors), so the graph reads them where they are rather than copying each
        into its inputs at every replay.
        """
        if not self.policies:
            raise ValueError("a cache without policies is a DynamicCache; use transformers' StaticCache to compile it")
        for layer in self.layers:
            layer.make_static(new_tokens)
        for policy in self.policies:  # AQUA's bases, retrieval's proxies: read by every step, never moved
            for tensor in policy.tensors():
                torch._dynamo.mark_static_address(tensor)

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
            keeps what it needs of earlier padding itself (a plain cache, with no policy: the left
            padding of its earlier ``prefill`` calls, see :meth:`real_tokens_seen`). ``None``: no
            padding among these tokens.

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
        if attention_mask is None and offset and bool((self.real_tokens_seen() < offset).any()):
            attention_mask = torch.ones_like(input_ids)  # no new padding, but positions skip the earlier one
        positions = past = None
        if attention_mask is not None:
            real = self.real_tokens_seen().to(attention_mask.device)
            positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0) + real[:, None]
            past = attention_mask.new_ones(attention_mask.shape[0], offset)
            if not self.policies:  # a compressing layer masks its own past; a plain one attends what the mask says
                pad = (offset - real)[:, None]
                past = (torch.arange(offset, device=attention_mask.device) >= pad).to(attention_mask.dtype)
                past = past.expand(attention_mask.shape[0], -1)
        logits = None
        with torch.no_grad():
            for lo in range(0, total, chunk):
                hi = min(lo + chunk, total)
                kwargs: dict[str, Any] = {}
                if attention_mask is not None:
                    kwargs["attention_mask"] = torch.cat([past, attention_mask[:, :hi]], dim=1)
                    kwargs["position_ids"] = positions[:, lo:hi]
                out = self._model(input_ids[:, lo:hi], **cache_kwargs(self._model, self), use_cache=True,
                                  logits_to_keep=1, **kwargs)
                logits = out.logits[:, -1]
        if attention_mask is not None and not self.policies:
            pad = (attention_mask == 0).sum(-1)
            self._plain_pad = pad if self._plain_pad is None else self._plain_pad + pad
        return logits

    def real_tokens_seen(self) -> torch.Tensor:
        """Real (not padding) tokens each sequence has fed so far, int64 ``(batch,)``: its next token's position.

        A compressing cache learns its padding from the attention mask of every forward; a plain cache
        (no policy: ``transformers``' own layers, which keep no mask) only from the masks given to
        :meth:`prefill`, so padding fed to the model directly counts as tokens there.
        """
        layer = self.layers[0]
        if isinstance(layer, CompressedLayer) and layer.is_initialized:
            layer.finalize()
            return (layer.seen - layer.left_pad[:, 0, 0]).long()
        if self._plain_pad is not None:
            return (self.get_seq_length() - self._plain_pad).long()
        batch = layer.keys.shape[0] if layer.is_initialized else 1
        return torch.full((batch,), self.get_seq_length(), dtype=torch.long)

    def retrieval_stats(self) -> dict[str, float] | None:
        """What a retrieval cache's decode steps read: hit rate, rows and bytes copied from the tier per step.

        Returns ``None`` for a cache without a retrieval tier. Keys: ``decode_steps`` (per layer),
        ``hit_rate`` (retrieved rows the working set already held), ``rows_per_step`` and
        ``bytes_per_step`` (copied from the tier at a decode step, all layers), ``chunk_bytes`` (copied
        for chunks' attention, all of it).
        """
        tiers = [layer.tier for layer in self.layers if isinstance(layer, CompressedLayer) and layer.tier is not None
                 and layer.is_initialized]
        if not tiers:
            return None
        steps = tiers[0].steps
        retrieved = sum(t.retrieved for t in tiers)
        fetched = sum(t.fetched for t in tiers)
        return {
            "decode_steps": steps,
            "hit_rate": sum(t.hits for t in tiers) / retrieved if retrieved else float("nan"),
            "rows_per_step": fetched / steps if steps else 0.0,
            "bytes_per_step": sum(t.fetched * t.row_nbytes() for t in tiers) / steps if steps else 0.0,
            "chunk_bytes": sum(t.chunk_fetched * t.row_nbytes() for t in tiers),
        }

    # --------------------------------------------------------------- accounting
    def nbytes(self, tier: str = "device", device: torch.device | str | None = None) -> int:
        """Bytes of every tensor the cache holds now: keys, values, slot metadata, projection matrices.

        Parameters
        ----------
        tier : {"device", "host", "all"}
            ``device``: what the model's devices hold (everything, unless a retrieval tier is
            offloaded); ``host``: the offloaded tier; ``all``: both.
        device : torch.device or str, optional
            Only the bytes on this device (``"cuda:1"``; ``"cuda"`` counts every CUDA device): a
            model split over devices holds each layer's bytes on that layer's device. ``None``: all.

        """
        report = self.memory_report()
        by_tier = {"device": report.total, "host": report.host, "all": report.total + report.host}
        if tier not in by_tier:
            raise ValueError(f"nbytes(tier={tier!r}): use 'device', 'host' or 'all'")
        if device is None:
            return by_tier[tier]
        return report.bytes_on(device, tier)

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
                kind = "sliding" if window else ("retrieval" if layer.tier is not None else "compressed")
                keys = layer.keys.nbytes + (layer.exact.keys.nbytes if layer.exact is not None else 0)
                values = layer.values.nbytes
                if layer.tier is not None:
                    on_device = layer.tier.device_tensors()
                    keys += sum(on_device[n].nbytes for n in ("proxy", "proxy_scale", "ws_keys", "tier_keys")
                                if n in on_device)
                    values += sum(on_device[n].nbytes for n in ("ws_values", "tier_values") if n in on_device)
                meta = layer.nbytes() - keys - values
                rows.append(MemoryRow(i, kind, slots, layer.held_tokens(), keys, values, meta, dense,
                                      layer.host_nbytes(), device_name(layer.keys.device)))
            else:
                rows.append(MemoryRow(i, "dense", slots, batch * heads * slots, layer.keys.nbytes,
                                      layer.values.nbytes, 0, dense, device=device_name(layer.keys.device)))
        devices = self._policy_devices()
        return MemoryReport(tuple(rows), sum(devices.values()), self.get_seq_length(), tuple(devices.items()))

    def _policy_devices(self) -> dict[str, int]:
        """The policies' own bytes by device: channel bases where each layer's are, proxy bases (and copies)."""
        parts = [(t.device, t.nbytes) for policy in self.policies for t in policy.tensors()]
        out: dict[str, int] = {}
        for device, n in parts:
            out[device_name(device)] = out.get(device_name(device), 0) + n
        return out


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

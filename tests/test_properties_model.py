"""Property tests (hypothesis), model level: whole caches on the tiny random-weight decoders of
``tests/tiny_models.py``.

A cache that evicts nothing gives ``DynamicCache``'s logits (chunked, padded, batched, AQUA with every
held token exact), and each row of a left-padded batch gives the logits (and holds the tokens) of that
row run alone, under evicting policies. The tensor level (one layer's invariants) is in
test_properties.py; the hypothesis profiles both use are in property_settings.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from hypothesis import Phase, assume, event, given
from hypothesis import strategies as st
from property_settings import TOL, examples
from tiny_models import byte_tokenizer, make_tiny_model
from transformers import DynamicCache

from kvpress_aqua import CompressedCache
from kvpress_aqua.artifacts.aqua import AquaArtifact
from kvpress_aqua.calibration import calibrate
from kvpress_aqua.core.accounting import capped_budget, decode_slots, layer_nbytes
from kvpress_aqua.policies import H2O, TOVA, SlidingWindow
from kvpress_aqua.policies.aqua import Aqua
from kvpress_aqua.util.compat import cache_kwargs

# ------------------------------------------------------------------------------- model level
MODELS = [("llama", None), ("qwen3", None), ("mistral", 6), ("phi3", None), ("gemma", None)]
"""Tiny random-weight decoders (``tests/tiny_models.py``); mistral with its own sliding window of 6."""
TEXT = "A lighthouse keeper counts the ships that pass the harbour each night and logs the weather. " * 10


@functools.cache
def _model(arch: str, window: int | None):
    return make_tiny_model(arch, **({"sliding_window": window} if window else {}))


@functools.cache
def _artifact(arch: str, window: int | None) -> AquaArtifact:
    model = _model(arch, window)
    return calibrate(model, byte_tokenizer(model.config.vocab_size), TEXT, tokens=400, chunk=128, progress=False)


@dataclass
class Batch:
    """Left-padded prompts, a prefill chunk, an optional second prefill call, and the decode steps that follow."""

    model: tuple[str, int | None]
    lengths: list[int]
    chunk: int | None
    steps: int
    seed: int
    split: int | None = None
    """The prompt is prefilled in two calls (a context, then a question), split at this column."""

    @property
    def width(self) -> int:
        return max(self.lengths)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        ids = torch.zeros(len(self.lengths), self.width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(self.lengths):
            ids[i, self.width - n:] = torch.randint(3, 128, (n,), generator=gen)
            mask[i, self.width - n:] = 1
        return ids, mask

    def bounds(self) -> list[tuple[int, int]]:
        """The ``[lo, hi)`` columns of each forward of the prompt (``prefill`` chunks each call from its start)."""
        calls = [(0, self.width)] if self.split is None else [(0, self.split), (self.split, self.width)]
        return [(lo, min(lo + (self.chunk or b - a), b)) for a, b in calls for lo in range(a, b, self.chunk or b - a)]


@st.composite
def batches(draw, rows: tuple[int, int] = (1, 3), max_len: int = 14) -> Batch:
    lengths = draw(st.lists(st.integers(1, max_len), min_size=rows[0], max_size=rows[1]))
    width = max(lengths)
    split = draw(st.none() | st.integers(1, width - 1)) if width > 1 else None
    return Batch(model=draw(st.sampled_from(MODELS)), lengths=lengths, chunk=draw(st.none() | st.integers(1, 8)),
                 steps=draw(st.integers(1, 5)), seed=draw(st.integers(0, 2**16)), split=split)


def _aqua(knobs: dict | None, batch: Batch) -> list:
    return [] if knobs is None else [Aqua(**knobs, artifact=_artifact(*batch.model))]


def _decode(model, cache, logits, mask, steps, forced=None, check_positions=False):
    """Greedy (or ``forced``) decode steps of a left-padded batch; returns every step's logits ``(B, 1 + steps, V)``."""
    out, full, position = [logits], mask, mask.sum(-1)
    for step in range(steps):
        token = out[-1].argmax(-1) if forced is None else forced[:, step]
        if check_positions:  # the next position of each row: its real tokens so far, step by step
            assert torch.equal(cache.real_tokens_seen(), position)
        full = torch.cat([full, full.new_ones(full.shape[0], 1)], 1)
        logits = model(token[:, None], attention_mask=full, position_ids=position[:, None],
                       **cache_kwargs(model, cache)).logits[:, -1]
        out.append(logits)
        position = position + 1
    return torch.stack(out, 1)


def _dense_run(model, ids, mask, steps):
    cache = DynamicCache()
    with torch.no_grad():
        position = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(ids, attention_mask=mask, position_ids=position, **cache_kwargs(model, cache)).logits[:, -1]
        return _decode(model, cache, logits, mask, steps)


def _watch_held(cache: CompressedCache) -> None:
    """Check at every layer update: only the layer being fed holds more than its budget + 1, and at most
    budget + n for a chunk of n (a prompt fed in one forward is held in full by one layer at a time)."""
    update, info, token = cache.update, cache.info, cache.token_policy
    budgets = [capped_budget(token.budget if token else None, info.sliding_window if info.is_sliding(i) else None)
               for i in range(info.num_layers)]

    def watched(keys, values, layer_idx, *args, **kwargs):
        out = update(keys, values, layer_idx, *args, **kwargs)
        n = keys.shape[-2]
        for i, layer in enumerate(cache.layers):
            if budgets[i] is not None and layer.is_initialized:
                assert layer.keys.shape[-2] <= budgets[i] + (n if i == layer_idx else 1), (i, layer_idx, n)
        return out

    cache.update = watched


def _compressed_run(model, cache, batch, ids, mask, forced, check_positions=True):
    if cache.policies:
        _watch_held(cache)
    with torch.no_grad():
        if batch.split is None:
            logits = cache.prefill(ids, mask)
        else:
            cache.prefill(ids[:, :batch.split], mask[:, :batch.split])
            if check_positions:
                assert torch.equal(cache.real_tokens_seen(), mask[:, :batch.split].sum(-1))
            logits = cache.prefill(ids[:, batch.split:], mask[:, batch.split:])
        return _decode(model, cache, logits, mask, batch.steps, forced, check_positions=check_positions)


def _check_cache_bytes(cache: CompressedCache, batch: Batch) -> None:
    """The whole cache: ``nbytes()`` is the layers' tensors plus AQUA's matrices, and the planner's formula."""
    info, aqua = cache.info, cache.channel_policy
    rows, width = len(batch.lengths), batch.width
    seen = width + batch.steps
    assert cache.get_seq_length() == seen
    token = cache.token_policy
    total = 0
    for i, layer in enumerate(cache.layers):
        window = info.sliding_window if info.is_sliding(i) else None
        key_dim = aqua.key_dim(i) if aqua is not None else info.head_dim
        exact = aqua.exact_sinks + aqua.exact_recent if aqua is not None and key_dim < info.head_dim else 0
        if batch.split is not None:
            # two prefill calls: not the planner's schedule. The bytes still follow the slots held.
            slots = layer.keys.shape[-2]
        else:
            slots = decode_slots(token.budget if token else None, seen, window, prompt=width, chunk=batch.chunk)
        assert layer.keys.shape[-2] == slots
        total += layer_nbytes(rows, info.num_kv_heads, slots, key_dim, info.head_dim, 4, compressed=True,
                              needs_scores=bool(token and token.needs_scores), exact_tokens=exact,
                              residual_dim=info.head_dim - key_dim)
    if aqua is not None:
        keeps_exact = aqua.exact_sinks + aqua.exact_recent > 0
        total += sum(info.num_kv_heads * info.head_dim * (info.head_dim if keeps_exact else aqua.key_dim(i)) * 4
                     for i in range(info.num_layers))
    assert cache.nbytes() == total


@st.composite
def lossless(draw, batch: Batch) -> list:
    """Policies that, on this batch, evict nothing and keep every stored key exact."""
    big = batch.width + batch.steps
    token = draw(st.sampled_from(["none", "sliding", "h2o", "tova"]))
    sinks = draw(st.integers(0, 3))
    if batch.model[1] is not None:
        sinks = min(sinks, batch.model[1] - 1)
    extra = draw(st.integers(0, 4))
    policies = {
        "none": [],
        "sliding": [SlidingWindow(sinks=sinks, window=big - sinks + extra)] if big > sinks else [],
        "h2o": [H2O(heavy=big + extra, recent=draw(st.integers(0, 3)), sinks=sinks)],
        "tova": [TOVA(heavy=big + extra, recent=draw(st.integers(0, 3)), sinks=sinks)],
    }[token]
    channel = draw(st.sampled_from(["none", "full", "exact"]))
    if channel == "full":  # every channel kept, in a calibrated or trivial basis
        policies += _aqua({"k_ratio": 1.0, "basis": draw(st.sampled_from(["svd", "identity", "think"])),
                           "exact_recent": draw(st.integers(0, 3))}, batch)
    elif channel == "exact":  # channels pruned, but every token is among the exact ones
        policies += _aqua({"k_ratio": draw(st.sampled_from([0.25, 0.5])),
                           "basis": draw(st.sampled_from(["svd", "identity", "think"])),
                           "per_layer": draw(st.sampled_from(["uniform", "spectrum"])),
                           "exact_sinks": draw(st.integers(0, 3)), "exact_recent": big + extra}, batch)
    return policies


@examples(150)
@given(data=st.data(), batch=batches())
def test_no_eviction_equals_dynamic_cache(data, batch):
    """A cache that evicts nothing (any chunking, padding, batch) gives DynamicCache's logits, step by step."""
    policies = data.draw(lossless(batch), label="policies")
    model = _model(*batch.model)
    ids, mask = batch.tensors()
    want = _dense_run(model, ids, mask, batch.steps)
    cache = CompressedCache(model, *policies, prefill_chunk=batch.chunk)
    try:
        got = _compressed_run(model, cache, batch, ids, mask, forced=want[:, :-1].argmax(-1))
    finally:
        cache.detach()
    assert (got - want).abs().max().item() < TOL
    if policies:
        _check_cache_bytes(cache, batch)
    else:
        assert cache.nbytes() == cache.dense_nbytes()


_EVICTING = st.one_of(
    st.builds(SlidingWindow, sinks=st.integers(0, 2), window=st.integers(1, 6)),
    st.tuples(st.integers(0, 6), st.integers(0, 4), st.integers(0, 2)).filter(lambda t: sum(t) > 0).flatmap(
        lambda t: st.sampled_from([H2O(*t), TOVA(*t)])),
)
_LOSSY_AQUA = st.fixed_dictionaries({
    "k_ratio": st.sampled_from([0.5, 0.75, 1.0]),
    "q_ratio": st.sampled_from([1.0, 0.5]),
    "basis": st.sampled_from(["svd", "identity", "think"]),
    "per_layer": st.sampled_from(["uniform", "spectrum"]),
    "exact_sinks": st.integers(0, 2),
    "exact_recent": st.integers(0, 4),
})


def _single_run(model, policies, row, pad, batch, forced):
    """One row alone, unpadded, its prompt fed in the pieces the padded batch's forwards hold of it."""
    cache = CompressedCache(model, *policies)
    with torch.no_grad():
        for lo, hi in batch.bounds():
            a, b = max(lo, pad) - pad, hi - pad
            if b > a:
                logits = model(row[None, a:b], **cache_kwargs(model, cache)).logits[:, -1]
        out = [logits]
        for token in forced:
            out.append(model(token.view(1, 1), **cache_kwargs(model, cache)).logits[:, -1])
    cache.detach()
    return torch.stack(out, 1)[0], cache


def _held(cache: CompressedCache, row: int) -> list[set]:
    """Per layer and KV head, the positions (among the row's real tokens) of the tokens held."""
    cache.finalize()
    held = []
    for layer in cache.layers:
        position = layer.index[row] - layer.left_pad[row, 0]
        held.append([frozenset(position[h][layer.valid[row, h]].tolist()) for h in range(layer.num_kv_heads)])
    return held


@examples(100)
@given(batch=batches(rows=(2, 3), max_len=18), token=st.one_of(_EVICTING, _EVICTING, _EVICTING, st.none()),
       aqua=st.none() | _LOSSY_AQUA)
def test_padded_batch_rows_equal_single_rows(batch, token, aqua):
    """Each row of a left-padded, chunked batch gives the logits and holds the tokens of that row run alone."""
    assume(token is not None or aqua is not None)
    if batch.model[1] is not None and token is not None:
        assume(token.sinks <= batch.model[1] - 1)
    model = _model(*batch.model)

    def policies():
        return [p for p in (token,) if p is not None] + _aqua(aqua, batch)

    ids, mask = batch.tensors()
    cache = CompressedCache(model, *policies(), prefill_chunk=batch.chunk)
    try:
        got = _compressed_run(model, cache, batch, ids, mask, forced=None)
    finally:
        cache.detach()
    forced = got[:, :-1].argmax(-1)
    width = batch.width
    _check_cache_bytes(cache, batch)
    for i, n in enumerate(batch.lengths):
        alone, single = _single_run(model, policies(), ids[i, width - n:], width - n, batch, forced[i])
        assert (got[i] - alone).abs().max().item() < TOL, f"row {i}"
        assert _held(cache, i) == _held(single, 0), f"row {i}"
    real = torch.tensor(batch.lengths)[:, None] + batch.steps
    evicted = any(bool((layer.valid.sum(-1) < real).any()) for layer in cache.layers)
    event("evicted" if evicted else "nothing evicted")


@examples(10, phases=[Phase.explicit, Phase.generate])
@given(batch=batches(rows=(2, 3)).filter(lambda b: b.split is not None and min(b.lengths) < b.width))
def test_plain_cache_with_padding_prefilled_in_two_calls(batch):
    """A plain cache (no policy) prefilled as context then question keeps the left padding of the first call.

    Was a bug: real_tokens_seen counted the padding and prefill marked every earlier token attendable, so
    the question got positions shifted by the padding and attended it (logits off by ~0.2).
    """
    model = _model(*batch.model)
    ids, mask = batch.tensors()
    want = _dense_run(model, ids, mask, batch.steps)
    cache = CompressedCache(model, prefill_chunk=batch.chunk)
    got = _compressed_run(model, cache, batch, ids, mask, forced=want[:, :-1].argmax(-1))
    assert (got - want).abs().max().item() < TOL

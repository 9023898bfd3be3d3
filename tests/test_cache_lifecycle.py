"""The cache's life on a model: detach and reuse, several caches on one model, buffers sized by what is seen,
one-shot prompts held in full by one layer at a time, blockwise attention equal to one block."""

import gc

import pytest
import torch
from tiny_models import make_tiny_model
from transformers import DynamicCache

from kvpress_aqua import CompressedCache
from kvpress_aqua.attention.dispatch import ATTENTION_NAME
from kvpress_aqua.core.accounting import GROWTH_MIN, decode_slots, layer_nbytes, prefill_slots
from kvpress_aqua.ops import limits
from kvpress_aqua.policies import H2O, TOVA, SlidingWindow
from kvpress_aqua.util.compat import cache_kwargs

TOL = 1e-4


def _generate(model, ids, cache, steps=6, **kw):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **cache_kwargs(model, cache), **kw)
    return torch.stack(out.logits, 1)


def _ids(model, batch, length, seed):
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------- detach, reuse, several caches
def test_a_detached_cache_reattaches_when_used_again():
    model = make_tiny_model("llama")
    context, question = _ids(model, 1, 20, 1), _ids(model, 1, 6, 2)
    full = torch.cat([context, question], 1)
    want = _generate(model, full, DynamicCache())
    cache = CompressedCache(model, H2O(heavy=100, recent=8))
    with torch.no_grad():
        model(context, **cache_kwargs(model, cache))
    cache.detach()
    assert model.config._attn_implementation == "sdpa"
    got = _generate(model, full, cache)  # reuse after detach: the cache re-attaches on its next update
    assert (got - want).abs().max().item() < TOL
    assert model.config._attn_implementation == ATTENTION_NAME
    cache.detach()
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("order", ["a-first", "b-first"])
def test_two_live_caches_on_one_model_are_independent(order):
    model = make_tiny_model("qwen2")
    ids = _ids(model, 2, 18, 3)
    policy = SlidingWindow(sinks=2, window=9)
    want = _generate(model, ids, CompressedCache(model, policy))
    a, b = CompressedCache(model, policy), CompressedCache(model, H2O(heavy=6, recent=3))
    first, second = (a, b) if order == "a-first" else (b, a)
    first.detach()
    # the other cache is still live: the model keeps the compressed attention
    assert model.config._attn_implementation == ATTENTION_NAME
    got = _generate(model, ids, a)
    assert (got - want).abs().max().item() < TOL
    second.detach()
    a.detach()
    assert model.config._attn_implementation == "sdpa"


def test_the_last_collected_cache_gives_the_model_its_attention_back():
    model = make_tiny_model("llama")
    model.set_attn_implementation("eager")
    ids = _ids(model, 1, 12, 4)
    with torch.no_grad():
        want = model(ids).logits
    caches = [CompressedCache(model, H2O(heavy=8, recent=4)) for _ in range(2)]
    with torch.no_grad():  # without a cache of ours in the call, standard attention runs (SDPA = eager math)
        assert (model(ids).logits - want).abs().max().item() < TOL
    caches.pop()
    gc.collect()
    assert model.config._attn_implementation == ATTENTION_NAME
    caches.pop()
    gc.collect()
    assert model.config._attn_implementation == "eager"


# ---------------------------------------------------------------- buffers sized by what is seen
def test_a_budget_larger_than_the_sequence_holds_what_a_full_cache_holds():
    """H2O(4096 + 4096) on a 37-token prompt: slots follow the tokens seen (+ one growth step), not the budget."""
    model = make_tiny_model("llama")
    ids = _ids(model, 1, 37, 5)
    cache = CompressedCache(model, H2O(heavy=4096, recent=4096))
    want = _generate(model, ids, DynamicCache(), steps=8)
    got = _generate(model, ids, cache, steps=8)
    assert (got - want).abs().max().item() < TOL
    seen = cache.get_seq_length()
    slots = {layer.keys.shape[-2] for layer in cache.layers}
    assert slots == {decode_slots(8192, seen, prompt=37)} == {37 + GROWTH_MIN}
    cfg = model.config
    per_layer = layer_nbytes(1, cfg.num_key_value_heads, max(slots), cfg.head_dim, cfg.head_dim, 4, compressed=True,
                             needs_scores=True)
    # one growth step and the per-slot metadata are all that a never-evicting compressed cache adds to dense bytes
    assert cache.nbytes() == per_layer * cfg.num_hidden_layers


def test_a_huge_budget_on_a_padded_batch_stays_small():
    model = make_tiny_model("llama")
    ids = _ids(model, 2, 30, 6)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    cache = CompressedCache(model, H2O(heavy=100_000, recent=100_000))
    _generate(model, ids, cache, steps=4, attention_mask=mask, pad_token_id=0)
    assert max(layer.keys.shape[-2] for layer in cache.layers) <= cache.get_seq_length() + GROWTH_MIN


def test_decode_buffer_grows_in_steps_and_stops_at_budget_plus_one():
    model = make_tiny_model("llama")
    budget = 100
    cache = CompressedCache(model, SlidingWindow(sinks=2, window=budget - 2))
    ids = _ids(model, 1, 10, 7)
    sizes = []
    with torch.no_grad():
        logits = model(ids, **cache_kwargs(model, cache)).logits[:, -1]
        for _ in range(120):
            logits = model(logits.argmax(-1, keepdim=True), **cache_kwargs(model, cache)).logits[:, -1]
            sizes.append(cache.layers[0].keys.shape[-2])
    assert sizes[0] == 10 + GROWTH_MIN and sizes[-1] == budget + 1
    steps = sorted(set(sizes))
    assert all(b - a == min(GROWTH_MIN, budget + 1 - a) for a, b in zip(steps, steps[1:], strict=False))
    assert all(size == decode_slots(budget, 11 + i, prompt=10) for i, size in enumerate(sizes))


@pytest.mark.parametrize("policy,prompt,chunk,held", [
    (H2O(heavy=10, recent=10), 5, 4, 20),  # the last chunk of 1 token starts the decode buffer: 4 + 16 slots
    (SlidingWindow(sinks=0, window=2), 1, None, 3),  # a 1-token prompt: a buffer of budget + 1
    (H2O(heavy=30, recent=10), 6, 1, 16),  # every chunk of 1 token: the buffer fills from empty
    (H2O(heavy=10, recent=10), 9, 4, 21),  # 4 + 4 appended, then a decode buffer grown to budget + 1
])
def test_a_prompt_chunk_of_one_token_is_a_decode_step_and_the_formula_says_so(policy, prompt, chunk, held):
    """A budgeted layer stores any 1-token update in its decode buffer: prefill_slots/decode_slots follow it."""
    model = make_tiny_model("llama")
    cache = CompressedCache(model, policy, prefill_chunk=chunk)
    with torch.no_grad():
        logits = cache.prefill(_ids(model, 2, prompt, 8))
        cache.finalize()
        assert {layer.keys.shape[-2] for layer in cache.layers} == {prefill_slots(policy.budget, prompt, chunk)} \
            == {held}
        for step in range(25):
            logits = model(logits.argmax(-1, keepdim=True), **cache_kwargs(model, cache)).logits[:, -1]
            cache.finalize()
            want = decode_slots(policy.budget, prompt + step + 1, prompt=prompt, chunk=chunk)
            assert {layer.keys.shape[-2] for layer in cache.layers} == {want}, step


# --------------------------------------------------------- one-shot prompts and blockwise attention
@pytest.mark.parametrize("policy", [SlidingWindow(sinks=2, window=10), TOVA(heavy=6, recent=4, sinks=1)],
                         ids=["sliding", "tova"])
def test_a_prompt_fed_in_one_forward_is_held_in_full_by_one_layer_at_a_time(policy):
    model = make_tiny_model("llama", num_hidden_layers=5)
    ids = _ids(model, 2, 60, 8)
    cache = CompressedCache(model, policy)
    held_at_each_update = []
    for layer in cache.layers:
        def spy(keys, values, *args, update=layer.update, **kwargs):
            out = update(keys, values, *args, **kwargs)
            held_at_each_update.append([other.keys.shape[-2] if other.is_initialized else 0 for other in cache.layers])
            return out
        layer.update = spy
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    full = [sum(size > policy.budget + 1 for size in sizes) for sizes in held_at_each_update]
    assert max(full) == 1  # the layer before was evicted when this one updated
    cache.finalize()
    assert {layer.keys.shape[-2] for layer in cache.layers} == {policy.budget}


@pytest.mark.parametrize("arch", ["llama", "gemma", "mistral"])
def test_blockwise_attention_equals_one_block(arch, monkeypatch):
    """Query rows in blocks of a few rows give the same logits, scores and held tokens as one block."""
    model = make_tiny_model(arch, **({"sliding_window": 7} if arch == "mistral" else {}))
    ids = _ids(model, 2, 40, 9)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0

    def run():
        cache = CompressedCache(model, H2O(heavy=9, recent=4, sinks=1), prefill_chunk=16)
        logits = _generate(model, ids, cache, steps=5, attention_mask=mask, pad_token_id=0)
        cache.finalize()
        return logits, [(layer.index.clone(), layer.score.clone()) for layer in cache.layers]

    one_logits, one_state = run()
    monkeypatch.setattr(limits, "BLOCK_SCORE_BYTES", 1)  # one query row per block
    blocked_logits, blocked_state = run()
    assert (one_logits - blocked_logits).abs().max().item() < 1e-5
    for (index_a, score_a), (index_b, score_b) in zip(one_state, blocked_state, strict=True):
        assert torch.equal(index_a, index_b)
        assert torch.allclose(score_a, score_b, atol=1e-5)


def test_a_with_block_gives_the_model_its_attention_back():
    model = make_tiny_model("llama")
    ids = _ids(model, 1, 12, 0)
    with CompressedCache(model, SlidingWindow(sinks=2, window=6)) as cache:
        _generate(model, ids, cache, steps=2)
        assert model.config._attn_implementation == ATTENTION_NAME
    assert model.config._attn_implementation == "sdpa"
    assert cache.get_seq_length() > 0  # still usable: the next update re-attaches


def test_a_plain_cache_refuses_a_larger_batch_with_what_to_do():
    model = make_tiny_model("llama")
    cache = CompressedCache(model)
    _generate(model, _ids(model, 1, 8, 0), cache, steps=2)
    with pytest.raises(ValueError, match="holds 1 sequences but was given a batch of 2; build a new CompressedCache"):
        with torch.no_grad():  # a forward, not generate: transformers 4.x's generate slices a shorter prompt away first
            model(_ids(model, 2, 8, 1), **cache_kwargs(model, cache))


@pytest.mark.parametrize("policies", [(), (SlidingWindow(sinks=2, window=6),)], ids=["plain", "compressed"])
@pytest.mark.parametrize("layers", [1, 3])
def test_a_cache_refuses_a_model_with_another_layer_count(policies, layers):
    built_for, other = make_tiny_model("llama"), make_tiny_model("llama", num_hidden_layers=layers)
    cache = CompressedCache(built_for, *policies)
    with pytest.raises(ValueError, match=r"this cache was built for .* \(2 layers\).*build a new CompressedCache"):
        # two forwards: a 1-layer model is noticed when its second forward starts again at layer 0
        _generate(other, _ids(other, 1, 8, 0), cache, steps=2)
    cache.reset()  # empty again: the model it was built for runs it
    _generate(built_for, _ids(built_for, 1, 8, 0), cache, steps=2)

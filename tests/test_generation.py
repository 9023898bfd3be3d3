"""The shared greedy decode loop: equal to transformers' greedy generate, EOS handling, bytes after the first step."""

import pytest
import torch
from tiny_models import make_tiny_model
from transformers import DynamicCache

from kvpress_aqua import CompressedCache
from kvpress_aqua.evaluation.generation import eos_ids, greedy_generate
from kvpress_aqua.evaluation.static_decode import decode_step
from kvpress_aqua.policies import H2O, BalanceKV, Retrieval, SlidingWindow
from kvpress_aqua.util.compat import cache_kwargs


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def _prompts(batch=2, length=24):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(0))


def _reference(model, ids, steps):
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, **cache_kwargs(model, DynamicCache()))
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("prefill_chunk,split", [(None, None), (8, None), (8, 16)])
def test_full_cache_equals_greedy_generate(model, prefill_chunk, split):
    ids = _prompts()
    cache = CompressedCache(model, prefill_chunk=prefill_chunk)
    out = greedy_generate(model, cache, ids, 6, eos=set(), prefill_tokens=split)
    cache.detach()
    assert torch.equal(out.tokens, _reference(model, ids, 6))
    # the full cache after the first decode step: prompt + 1 tokens per sequence, all of them dense
    assert out.kv_bytes == out.dense_kv_bytes
    assert out.dense_kv_bytes == 2 * 2 * 2 * (ids.shape[1] + 1) * 16 * 4  # layers, K and V, heads, tokens, d, fp32


def test_rows_stop_at_eos_and_are_filled(model):
    ids = _prompts(batch=2)
    free = greedy_generate(model, CompressedCache(model), ids, 5, eos=set())
    stop = int(free.tokens[0, 1])  # row 0's second token ends it
    out = greedy_generate(model, CompressedCache(model), ids, 5, eos={stop})
    row0 = out.tokens[0].tolist()
    assert row0[:2] == free.tokens[0, :2].tolist() and set(row0[2:]) <= {stop}
    if stop not in free.tokens[1].tolist():
        assert torch.equal(out.tokens[1], free.tokens[1])  # the other row goes on
    every = greedy_generate(model, CompressedCache(model), ids, 5, eos=set(free.tokens[:, 0].tolist()))
    assert every.tokens.shape == (2, 2)  # the first decode step still runs, to measure the bytes


def test_a_compressed_cache_is_measured_at_its_steady_state(model):
    ids = _prompts(batch=3, length=40)
    policy = SlidingWindow(sinks=2, window=14)
    cache = CompressedCache(model, policy, prefill_chunk=8)
    out = greedy_generate(model, cache, ids, 4, eos=set())
    cache.detach()
    assert out.tokens.shape == (3, 4)
    assert out.kv_bytes < 0.6 * out.dense_kv_bytes
    with pytest.raises(ValueError, match="at least 1"):
        greedy_generate(model, CompressedCache(model), ids, 0, eos=set())


def test_eos_ids_join_the_generation_config_and_the_tokenizer(model):
    class Tok:
        eos_token_id = 7

    assert eos_ids(model, Tok()) == {model.generation_config.eos_token_id, 7}


@pytest.mark.parametrize("policies", [(H2O(heavy=8, recent=4),), (Retrieval(top_k=4, recent=4, sinks=1, rank=4),),
                                      (), (BalanceKV(halvings=1, sinks=2, recent=2, block=8),)],
                         ids=["h2o", "retrieval", "full", "balancekv"])
@pytest.mark.parametrize("steps", [1, 5])
def test_a_given_step_decodes_through_a_static_cache_with_the_same_tokens(model, policies, steps):
    ids = _prompts(batch=2, length=30)
    want = greedy_generate(model, CompressedCache(model, *policies, prefill_chunk=8), ids, steps, eos=set(),
                           prefill_tokens=24)
    cache = CompressedCache(model, *policies, prefill_chunk=8)
    got = greedy_generate(model, cache, ids, steps, eos=set(), prefill_tokens=24, step=decode_step)
    assert torch.equal(got.tokens, want.tokens)
    assert 0 < got.kv_bytes <= want.kv_bytes  # a static buffer is sized once: never more than the growing one
    static = bool(policies) and not isinstance(policies[0], BalanceKV)  # a full cache, block summaries: growing
    assert got.static == static and cache.can_make_static == static
    assert all(getattr(layer, "static", False) for layer in cache.layers) == static

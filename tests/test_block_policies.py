"""BalanceKV, uniform sampling and SnapKV: what they keep, how the kept tokens are weighted, what they hold."""

import dataclasses
import math

import pytest
import torch
from tiny_models import ARCHS, byte_tokenizer, make_tiny_model
from transformers import DynamicCache

from kvpress_aqua import CompressedCache
from kvpress_aqua.calibration.calibrate import calibrate
from kvpress_aqua.core.accounting import layer_nbytes
from kvpress_aqua.ops.inputs import AttentionInputs
from kvpress_aqua.ops.reference import reference_attention
from kvpress_aqua.policies import Aqua, BalanceKV, SnapKV, Uniform
from kvpress_aqua.policies.base import SlotView
from kvpress_aqua.policies.blocks import Draws
from kvpress_aqua.util.compat import cache_kwargs

TOL = 1e-4


def _generate(model, ids, cache, steps=6, **kw):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             **cache_kwargs(model, cache), output_logits=True, return_dict_in_generate=True, **kw)
    return torch.stack(out.logits, 1), out.sequences


def _view(keys, values, seen=None, left_pad=0, log_weight=None, layer_idx=0):
    batch, heads, slots, _ = keys.shape
    index = torch.arange(slots, dtype=torch.int32).expand(batch, heads, slots)
    return SlotView(index=index, valid=torch.ones(batch, heads, slots, dtype=torch.bool), score=None,
                    seen=slots if seen is None else seen, left_pad=torch.full((batch, 1, 1), left_pad),
                    layer_idx=layer_idx, keys=keys, values=values,
                    log_weight=torch.zeros(batch, heads, slots) if log_weight is None else log_weight)


def _block(seed, batch=2, heads=3, slots=40, d=16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, slots, d, generator=gen), torch.randn(batch, heads, slots, d, generator=gen)


@pytest.mark.parametrize("make", [lambda seed: BalanceKV(sinks=4, recent=4, block=16, gamma=4.0, seed=seed),
                                  lambda seed: Uniform(sinks=4, recent=4, block=16, seed=seed)],
                         ids=["balancekv-random-walk", "uniform"])
def test_the_choice_is_deterministic_for_a_seed(make):
    keys, values = _block(0, slots=72)
    first, again = make(0).compact(_view(keys, values)), make(0).compact(_view(keys, values))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], make(1).compact(_view(keys, values))[0])



@pytest.mark.parametrize("cls", [BalanceKV, Uniform])
@pytest.mark.parametrize("halvings", [1, 2, 3])
def test_the_kept_count_is_the_rate_exactly(cls, halvings):
    keys, values = _block(1, slots=100)
    policy = cls(sinks=3, recent=5, block=16, halvings=halvings)
    kept, log_weight = policy.compact(_view(keys, values))
    blocks = (100 - 3 - 5) // 16  # 5 full blocks, 12 middle tokens pending
    assert kept.shape[-1] == 100 - blocks * (16 - (16 >> halvings)) == policy.held(100)
    assert (kept.diff(dim=-1) > 0).all()  # ascending
    assert torch.equal(kept[..., :3], torch.arange(3).expand(2, 3, 3))  # the sinks
    assert torch.equal(kept[..., -17:], torch.arange(83, 100).expand(2, 3, 17))  # pending middle and recent
    summarised = (kept >= 3) & (kept < 3 + blocks * 16)
    for b in range(blocks):  # each block keeps exactly 16 / 2**halvings tokens, each standing for 2**halvings
        in_block = (kept >= 3 + 16 * b) & (kept < 3 + 16 * (b + 1))
        assert (in_block.sum(-1) == 16 >> halvings).all()
    assert torch.allclose(log_weight[summarised], torch.tensor(halvings * math.log(2.0)))
    assert (log_weight[~summarised] == 0).all()
    # summaries are not reduced again
    after = _view(keys.gather(2, kept[..., None].expand(-1, -1, -1, 16)),
                  values.gather(2, kept[..., None].expand(-1, -1, -1, 16)), log_weight=log_weight, seen=100)
    assert policy.compact(SlotView(kept.int(), *dataclasses.astuple(after)[1:])) is None


def test_a_padded_batch_reduces_the_same_blocks_count_in_every_row():
    keys, values = _block(2, batch=1, slots=60)
    keys, values = keys.expand(2, -1, -1, -1), values.expand(2, -1, -1, -1)
    view = _view(keys, values)
    pad = torch.tensor([0, 20]).view(2, 1, 1)  # row 1: its first 20 slots are left padding
    view = SlotView(view.index, view.index >= pad, None, 60, pad, 0, keys, values, view.log_weight)
    kept, _ = Uniform(sinks=2, recent=2, block=8, halvings=1).compact(view)
    # row 1 has 34 pending middle tokens (4 blocks), row 0 has 54 (6): both reduce 4 blocks
    assert kept.shape[-1] == 60 - 4 * 4
    assert (kept[1] >= 20).sum(-1).eq(60 - 20 - 4 * 4).all()  # row 1: its 40 real tokens less 16
    assert (kept[0] >= 2 + 32).sum(-1).eq(60 - 34).all()  # row 0: its three later blocks are still pending


def test_reweighted_attention_over_a_hand_built_block_equals_the_formula():
    """An 8-token block halved once: the kept 4 stand for 2 each, the query's own token for itself."""
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, 1, 8, 4, generator=gen), torch.randn(1, 1, 8, 4, generator=gen)
    policy = BalanceKV(sinks=0, recent=0, block=8, halvings=1)
    kept, log_weight = policy.compact(_view(keys, values))
    assert kept.shape[-1] == 4 and torch.allclose(log_weight, torch.full((1, 1, 4), math.log(2.0)))
    k, v = keys[0, 0, kept[0, 0]], values[0, 0, kept[0, 0]]
    query, k_new, v_new = (torch.randn(1, 1, 1, 4, generator=gen) for _ in range(3))
    inputs = AttentionInputs(layer_idx=0, past_keys=k[None, None], past_values=v[None, None],
                             past_visible=torch.ones(1, 1, 4, dtype=torch.bool), keys_new=k_new, values_new=v_new,
                             past_log_weight=log_weight, first_index=8)
    out, _, _ = reference_attention(inputs, query, torch.ones(1, 1, 1, 1, dtype=torch.bool), 0.5)
    weights = torch.cat([2 * torch.exp(0.5 * k @ query[0, 0, 0]), torch.exp(0.5 * k_new[0, 0] @ query[0, 0, 0])])
    want = (weights[:, None] * torch.cat([v, v_new[0, 0]])).sum(0) / weights.sum()
    torch.testing.assert_close(out[0, 0, 0], want)


def test_the_walk_balances_better_than_chance():
    """Over many blocks the attention over the balanced half is nearer the full attention than over a random half."""
    gen = torch.Generator().manual_seed(4)
    keys = 2 * torch.randn(4, 8, 1, 1, 16, generator=gen) + 0.3 * torch.randn(4, 8, 1, 64, 16, generator=gen)
    values = torch.randn(4, 8, 1, 64, 16, generator=gen)  # keys cluster, as a head's keys do
    queries = torch.randn(32, 16, generator=gen)

    def error(kept):
        k, v = keys[:, :, 0], values[:, :, 0]
        w = torch.exp(k @ queries.T / 4)  # (4, 8, 64, queries)
        full = torch.einsum("bhnq,bhnd->bhqd", w, v) / w.sum(2)[..., None]
        mask = torch.zeros(4, 8, 64).scatter_(-1, kept[:, :, 0], 1.0)[..., None]
        half = torch.einsum("bhnq,bhnd->bhqd", w * mask, v) / (w * mask).sum(2)[..., None]
        return ((half - full).norm(dim=-1) / full.norm(dim=-1)).mean()

    walk = BalanceKV(halvings=1, block=64).choose(keys, values, Draws(torch.Generator().manual_seed(0)))
    draw = Uniform(halvings=1, block=64).choose(keys, values, Draws(torch.Generator().manual_seed(0)))
    assert error(walk) < 0.8 * error(draw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cls", [BalanceKV, Uniform])
def test_rate_one_equals_dynamic_cache(arch, cls):
    model = make_tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    ref, ref_seq = _generate(model, ids, DynamicCache())
    cache = CompressedCache(model, cls(halvings=0, sinks=2, recent=2, block=8))
    got, seq = _generate(model, ids, cache)
    cache.detach()
    assert torch.equal(seq, ref_seq) and (got - ref).abs().max().item() < TOL


@pytest.mark.parametrize("cls", [BalanceKV, Uniform])
def test_the_models_sliding_window_evicts_the_oldest_under_a_choosing_policy(cls):
    model = make_tiny_model("mistral", sliding_window=12)
    ids = torch.randint(0, model.config.vocab_size, (2, 60), generator=torch.Generator().manual_seed(8))
    ref, ref_seq = _generate(model, ids, DynamicCache())
    cache = CompressedCache(model, cls(halvings=0, sinks=2, recent=2, block=8), prefill_chunk=16)
    got, seq = _generate(model, ids, cache)
    cache.detach()
    assert torch.equal(seq, ref_seq) and (got - ref).abs().max().item() < TOL
    assert all(layer.slots.used <= 12 for layer in cache.layers)


@pytest.mark.parametrize("chunk", [None, 12])
def test_bytes_are_exact_log_weights_included(chunk):
    model = make_tiny_model("llama")
    ids = torch.randint(0, 128, (3, 50), generator=torch.Generator().manual_seed(6))
    policy = BalanceKV(sinks=4, recent=4, block=8, halvings=2)
    cache = CompressedCache(model, policy, prefill_chunk=chunk)
    _generate(model, ids, cache, steps=9)
    cache.finalize()  # fold the last step's attention in (it reduces what the step completed)
    seen = cache.get_seq_length()
    cfg = model.config
    for layer in cache.layers:
        assert layer.slots.log_weight is not None and layer.slots.used == policy.held(seen)
        held = sum(t.nbytes for t in layer._tensors().values())
        assert layer.nbytes() == held == layer_nbytes(3, cfg.num_key_value_heads, policy.held(seen), cfg.head_dim,
                                                      cfg.head_dim, 4, compressed=True, weighted=True)
    assert cache.nbytes() < 0.5 * cache.dense_nbytes()


def test_snapkv_left_padded_batch_equals_single_rows():
    policy = SnapKV(heavy=8, window=4, sinks=2)
    model = make_tiny_model("llama")
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (30, 21)]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    batched, _ = _generate(model, ids, CompressedCache(model, policy), attention_mask=mask, pad_token_id=0)
    for i, r in enumerate(rows):
        single, _ = _generate(model, torch.tensor([r]), CompressedCache(model, policy), pad_token_id=0)
        assert (batched[i] - single[0]).abs().max().item() < TOL


def test_stacks_with_aqua_and_frees_the_memory():
    """At full rank AQUA changes nothing (exact tokens included); at half rank the keys are half as wide."""
    model = make_tiny_model("llama")
    text = "A lighthouse keeper counts the ships that pass the harbour each night and logs the weather. " * 10
    artifact = calibrate(model, byte_tokenizer(model.config.vocab_size), text, tokens=400, chunk=128, progress=False)
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(8))
    policy = BalanceKV(sinks=4, recent=4, block=16)
    alone, _ = _generate(model, ids, CompressedCache(model, policy), steps=4)
    full_rank, _ = _generate(model, ids, CompressedCache(model, policy, Aqua(k_ratio=1.0, artifact=artifact)), steps=4)
    assert (alone - full_rank).abs().max().item() < 1e-3
    cache = CompressedCache(model, policy, Aqua(k_ratio=0.5, artifact=artifact, exact_sinks=2, exact_recent=4))
    _generate(model, ids, cache, steps=4)
    cache.finalize()
    cfg, seen = model.config, cache.get_seq_length()
    for layer in cache.layers:
        assert layer.keys.shape[-1] == cfg.head_dim // 2 and layer.slots.used == policy.held(seen)
        assert layer.nbytes() == layer_nbytes(1, cfg.num_key_value_heads, policy.held(seen), cfg.head_dim // 2,
                                              cfg.head_dim, 4, compressed=True, weighted=True, exact_tokens=6,
                                              residual_dim=cfg.head_dim // 2)
        assert layer.nbytes() < 0.4 * cache.dense_nbytes() / cfg.num_hidden_layers


def test_snapkv_ranks_by_the_pooled_window_attention():
    policy = SnapKV(heavy=2, window=2, sinks=0, kernel=3)
    score = torch.tensor([[[0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0]]])
    index = torch.tensor([[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]], dtype=torch.int32)
    view = SlotView(index, torch.ones_like(index, dtype=torch.bool), score, 10, torch.zeros(1, 1, 1), 0)
    rank = policy.priority(view)
    assert torch.isinf(rank[..., 8:]).all()  # the window
    torch.testing.assert_close(rank[0, 0, :8], torch.tensor([0.0, 3.0, 3.0, 3.0, 0.0, 1.0, 1.0, 1.0]))
    shuffled = torch.tensor([[[9, 0, 8, 1, 7, 2, 6, 3, 5, 4]]])  # slots out of position order (decode buffers)
    view = SlotView(index.gather(-1, shuffled), view.valid, score.gather(-1, shuffled), 10, view.left_pad, 0)
    torch.testing.assert_close(policy.priority(view), rank.gather(-1, shuffled))


def test_a_static_cache_refuses_a_choosing_policy():
    model = make_tiny_model("llama")
    cache = CompressedCache(model, BalanceKV())
    cache.prefill(torch.randint(0, 128, (1, 10)))
    with pytest.raises(ValueError, match="BalanceKV summarizes blocks"):
        cache.make_static(4)


@pytest.mark.parametrize("make,match", [
    (lambda: BalanceKV(block=6, halvings=2), "multiple of 2\\*\\*halvings = 4"),
    (lambda: Uniform(halvings=-1), "halvings=-1"),
    (lambda: BalanceKV(gamma=0), "gamma=0"),
    (lambda: BalanceKV(temperature=0), "temperature=0"),
    (lambda: SnapKV(heavy=4, kernel=4), "odd"),
    (lambda: SnapKV(heavy=4, window=0), "at least one query"),
])
def test_bad_knobs_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("policy", [BalanceKV(halvings=2, block=16), Uniform(halvings=2, block=16)],
                         ids=["balancekv", "uniform"])
def test_a_head_chooses_the_same_tokens_whichever_rank_holds_it(policy):
    """A tensor-parallel rank holding heads 2..3 of 4 keeps, for them, what one process holding all 4 keeps."""
    gen = torch.Generator().manual_seed(11)
    keys, values = torch.randn(2, 4, 3, 16, 8, generator=gen), torch.randn(2, 4, 3, 16, 8, generator=gen)
    every = policy.choose(keys, values, Draws(torch.Generator().manual_seed(5)))
    share = policy.choose(keys[:, 2:], values[:, 2:], Draws(torch.Generator().manual_seed(5), range(2, 4), 4))
    assert torch.equal(share, every[:, 2:])
    alone = policy.choose(keys[:, 2:], values[:, 2:], Draws(torch.Generator().manual_seed(5)))
    assert not torch.equal(alone, every[:, 2:])  # drawing for the held heads only would choose otherwise


def test_the_kernel_temperature_scales_the_key_logits():
    """``temperature t`` halves a block as temperature 1 halves it with keys scaled by ``sqrt(t)`` (exact for 1/4)."""
    gen = torch.Generator().manual_seed(11)
    keys, values = torch.randn(2, 3, 32, 8, generator=gen) * 3, torch.randn(2, 3, 32, 8, generator=gen)

    def halve(policy, k):
        return policy.halve(k, values, Draws(torch.Generator().manual_seed(0)))

    cool = halve(BalanceKV(temperature=0.25), keys)
    assert torch.equal(cool, halve(BalanceKV(), keys * 0.5))
    assert not torch.equal(cool, halve(BalanceKV(), keys))


def test_centred_values_make_the_walk_blind_to_a_shift_of_the_block_s_values():
    """``centre_values`` balances ``v - vbar``: adding one vector to every value changes no choice."""
    gen = torch.Generator().manual_seed(12)
    keys, values = torch.randn(2, 3, 32, 8, generator=gen), torch.randn(2, 3, 32, 8, generator=gen)
    values = 1.5 * values / values.norm(dim=-1, keepdim=True)  # ||v|| in [1.2, 1.8] shifted: one bucket
    shift = torch.randn(2, 3, 1, 8, generator=gen)
    shifted = values + 0.3 * shift / shift.norm(dim=-1, keepdim=True)

    def halve(policy, v):
        return policy.halve(keys, v, Draws(torch.Generator().manual_seed(0)))

    assert torch.equal(halve(BalanceKV(), values), halve(BalanceKV(), shifted))
    raw = BalanceKV(centre_values=False)
    assert not torch.equal(halve(raw, values), halve(raw, shifted))

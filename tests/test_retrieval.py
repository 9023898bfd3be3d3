"""Retrieval: a second tier of every token, proxy top-k at each decode step, exact attention over what it picks."""

import pytest
import torch
from tiny_models import ARCHS, byte_tokenizer, make_tiny_model
from transformers import AttentionInterface, DynamicCache

from kvpress_aqua import CompressedCache
from kvpress_aqua.calibration import calibrate
from kvpress_aqua.evaluation.static_decode import compiled_step, generate_static
from kvpress_aqua.ops.inputs import AttentionInputs, RetrievalInputs
from kvpress_aqua.ops.reference import reference_attention
from kvpress_aqua.ops.retrieval import chunk_attention, retrieve
from kvpress_aqua.policies import Aqua, Retrieval
from kvpress_aqua.presets.spec import parse_policy
from kvpress_aqua.util.compat import cache_kwargs

TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire. " * 8


def _artifact(model):
    return calibrate(model, byte_tokenizer(model.config.vocab_size), TEXT, tokens=256, chunk=128, progress=False)


def _run(model, cache, ids, prompt, chunk=None):
    """Logits of the last prompt token, then of each later token fed one at a time."""
    kw = cache_kwargs(model, cache)
    out = []
    with torch.no_grad():
        for lo in range(0, prompt, chunk or prompt):
            logits = model(ids[:, lo:min(prompt, lo + (chunk or prompt))], **kw).logits[:, -1]
        out.append(logits)
        for t in range(prompt, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], **kw).logits[:, -1])
    return torch.stack(out, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_top_k_covering_every_token_equals_dynamic_cache(arch):
    _assert_covering_top_k_equals_dynamic_cache(arch)


def _assert_covering_top_k_equals_dynamic_cache(arch):
    """A 30-token prompt in chunks of 8, then 14 decode steps, top_k above every count: DynamicCache's logits."""
    overrides = {"sliding_window": 12} if arch == "mistral" else {}
    model = make_tiny_model(arch, **overrides)
    ids = torch.randint(3, 128, (2, 44), generator=torch.Generator().manual_seed(1))
    want = _run(model, DynamicCache(), ids, 30, chunk=8)
    policy = Retrieval(top_k=64, recent=4, sinks=2, proxy="lrqk", rank=4)
    got = _run(model, CompressedCache(model, policy), ids, 30, chunk=8)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_chunks_equal_dynamic_cache(arch, monkeypatch):
    """An offloaded tier's chunks on a GPU stream the tier (chunk_attention): forced here, on one device."""
    from kvpress_aqua.ops import limits
    from kvpress_aqua.ops import retrieval as ops_retrieval

    calls = []
    real = ops_retrieval.chunk_attention
    monkeypatch.setattr(ops_retrieval, "streams", lambda inputs: True)
    monkeypatch.setattr(ops_retrieval, "chunk_attention", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(limits, "tier_block_rows", lambda rows, row_bytes: 7)  # several blocks per chunk
    model = _assert_covering_top_k_equals_dynamic_cache(arch)
    assert len(calls) == 4 * model.config.num_hidden_layers  # every chunk of every layer streamed


def test_the_aqua_proxy_and_stacking_with_aqua():
    model = make_tiny_model("llama")
    artifact = _artifact(model)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    want = _run(model, DynamicCache(), ids, 28, chunk=10)
    aqua_proxy = Retrieval(top_k=64, recent=4, sinks=2, proxy="aqua", rank=4, artifact=artifact)
    cache = CompressedCache(model, aqua_proxy)
    torch.testing.assert_close(_run(model, cache, ids, 28, chunk=10), want, atol=1e-4, rtol=0)
    bases = 2 * 2 * 16 * 4 * 4  # layers x (kv_heads, head_dim, rank) float32: the calibrated proxy bases
    assert aqua_proxy.nbytes() == bases and cache.memory_report().policy_bytes == bases
    assert cache.nbytes() == sum(layer.nbytes() for layer in cache.layers) + bases
    stacked = CompressedCache(model, Retrieval(top_k=64, recent=4, sinks=2, proxy="lrqk", rank=4),
                              Aqua(k_ratio=1.0, artifact=artifact))
    torch.testing.assert_close(_run(model, stacked, ids, 28, chunk=10), want, atol=1e-4, rtol=0)
    pruned = CompressedCache(model, Retrieval(top_k=64, recent=4, sinks=2, proxy="lrqk", rank=4),
                             Aqua(k_ratio=0.5, artifact=artifact))
    _run(model, pruned, ids, 28, chunk=10)
    layer = pruned.layers[0]
    assert layer.tier.keys.shape[-1] == layer.key_dim == 8  # the tier holds the pruned keys


def _masked_attention(masks):
    """Eager causal attention; the last query of layer ``l``, row ``b``, KV head ``h`` sees only ``masks[l][b, h]``."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        batch, heads, n, d = query.shape
        group = heads // key.shape[1]
        allowed = torch.ones(n, n, dtype=torch.bool).tril().expand(batch, heads, n, n).clone()
        allowed[:, :, -1] = masks[module.layer_idx].repeat_interleave(group, dim=1)
        scores = (query @ key.repeat_interleave(group, 1).transpose(-1, -2)) * (scaling or d ** -0.5)
        scores = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return (scores @ value.repeat_interleave(group, 1)).transpose(1, 2).contiguous(), None

    return attend


def test_a_small_top_k_equals_full_attention_masked_to_the_selected_slots():
    model = make_tiny_model("qwen2")
    ids = torch.randint(3, 128, (2, 33), generator=torch.Generator().manual_seed(3))
    cache = CompressedCache(model, Retrieval(top_k=3, recent=4, sinks=2, proxy="lrqk", rank=4))
    cache.prefill(ids[:, :32])  # one chunk: it attends to every token, so the history is exact
    cache.finalize()
    held = [(layer.slots.index.long(), layer.slots.valid) for layer in cache.layers]
    got = model(ids[:, 32:33], **cache_kwargs(model, cache)).logits[:, -1]
    masks = []
    for layer, (index, valid) in zip(cache.layers, held, strict=True):
        layer.finalize()
        mask = torch.zeros(2, 2, 33, dtype=torch.bool)
        mask.scatter_(2, index.where(valid, 32), True)  # the held slots (sinks + recent)
        chosen = layer.tier.ws_index
        assert chosen.shape[-1] == 3 and bool((chosen >= 0).all()) and not mask.gather(2, chosen).any()
        mask.scatter_(2, chosen, True)
        mask[..., 32] = True  # the new token itself
        assert int(mask.sum(-1).min()) == 6 + 3 + 1
        masks.append(mask)
    AttentionInterface.register("retrieval_masked_test", _masked_attention(masks))
    reference = make_tiny_model("qwen2")
    reference.set_attn_implementation("retrieval_masked_test")
    want = reference(ids[:, :33]).logits[:, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    full = model(ids[:, :33]).logits[:, -1]
    assert (full - got).abs().max() > 1e-3  # the selection matters: attending everything differs


def test_retrieve_picks_the_proxy_top_k_and_fetches_only_misses():
    torch.manual_seed(0)
    batch, kv_heads, group, d, seen = 1, 2, 2, 8, 20
    tier_k, tier_v = torch.randn(batch, kv_heads, seen + 1, d), torch.randn(batch, kv_heads, seen + 1, d)
    basis = torch.linalg.qr(torch.randn(kv_heads, d, d)).Q[..., :3]
    proxy = tier_k @ basis[None]
    held = torch.tensor([0, 1, 18, 19]).expand(batch, kv_heads, 4).int()
    query = torch.randn(batch, kv_heads * group, 1, d)
    old = torch.tensor([[[2, 5, 7], [3, 4, 6]]])
    tier = RetrievalInputs(tier_keys=tier_k, tier_values=tier_v, tier_valid=torch.ones(batch, kv_heads, seen + 1,
                           dtype=torch.bool), proxy_keys=proxy, proxy_basis=basis, held_index=held, top_k=3,
                           ws_index=old, ws_keys=tier_k.gather(2, old[..., None].expand(-1, -1, -1, d)),
                           ws_values=tier_v.gather(2, old[..., None].expand(-1, -1, -1, d)))
    held_at = [0, 1, 18, 19]
    inputs = AttentionInputs(layer_idx=0, past_keys=tier_k[:, :, held_at], past_values=tier_v[:, :, held_at],
                             past_visible=torch.ones(batch, kv_heads, 4, dtype=torch.bool),
                             keys_new=tier_k[:, :, seen:], values_new=tier_v[:, :, seen:], first_index=seen,
                             retrieval=tier)
    attended = retrieve(inputs, query, d ** -0.5)
    logits = (query.view(batch, kv_heads, group, d) @ basis) @ proxy[:, :, :seen].transpose(-1, -2) * d ** -0.5
    scores = logits.log_softmax(-1).amax(2)
    scores[..., [0, 1, 18, 19]] = float("-inf")
    want = scores.topk(3, -1).indices.sort(-1).values
    assert torch.equal(tier.selected, want)
    assert tier.hits == int(torch.isin(want[0, 0], old[0, 0]).sum() + torch.isin(want[0, 1], old[0, 1]).sum())
    assert tier.fetched == 6 - tier.hits
    torch.testing.assert_close(attended.past_keys[:, :, 4:], tier_k.gather(2, want[..., None].expand(-1, -1, -1, d)))
    out, _, _ = reference_attention(attended, query, torch.ones(1, 1, 1, 1, dtype=torch.bool), d ** -0.5)
    keep = torch.cat([torch.tensor(held_at).expand(batch, kv_heads, 4), want, torch.full_like(want[..., :1], seen)], -1)
    k = tier_k.gather(2, keep[..., None].expand(-1, -1, -1, d)).repeat_interleave(group, 1)
    v = tier_v.gather(2, keep[..., None].expand(-1, -1, -1, d)).repeat_interleave(group, 1)
    expect = ((query @ k.transpose(-1, -2)) * d ** -0.5).softmax(-1) @ v
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=0)


def test_misses_are_read_from_the_mapped_views_when_the_tier_has_them():
    """An offloaded tier on a GPU hands the attention device views of its pinned rows: misses come from them."""
    torch.manual_seed(1)
    batch, kv_heads, d, seen = 1, 2, 8, 20
    tier_k, tier_v = torch.randn(batch, kv_heads, seen + 1, d), torch.randn(batch, kv_heads, seen + 1, d)
    basis = torch.linalg.qr(torch.randn(kv_heads, d, d)).Q[..., :3]
    old = torch.tensor([[[2, 5, 7], [3, 4, 6]]])
    at = old[..., None].expand(-1, -1, -1, d)
    tier = RetrievalInputs(tier_keys=tier_k, tier_values=tier_v, tier_valid=torch.ones(batch, kv_heads, seen + 1,
                           dtype=torch.bool), proxy_keys=tier_k @ basis[None], proxy_basis=basis,
                           held_index=torch.tensor([0, 19]).expand(batch, kv_heads, 2).int(), top_k=6,
                           ws_index=old, ws_keys=tier_k.gather(2, at), ws_values=tier_v.gather(2, at),
                           mapped_keys=tier_k + 100, mapped_values=tier_v + 100)  # told apart from the host rows
    inputs = AttentionInputs(layer_idx=0, past_keys=tier_k[:, :, [0, 19]], past_values=tier_v[:, :, [0, 19]],
                             past_visible=torch.ones(batch, kv_heads, 2, dtype=torch.bool),
                             keys_new=tier_k[:, :, seen:], values_new=tier_v[:, :, seen:], first_index=seen,
                             retrieval=tier)
    attended = retrieve(inputs, torch.randn(batch, kv_heads * 2, 1, d), d ** -0.5)
    chosen = tier.selected[..., None].expand(-1, -1, -1, d)
    hit = torch.isin(tier.selected, old)[..., None]
    assert 0 < int(hit.sum()) < tier.selected.numel() and tier.fetched == tier.selected.numel() - tier.hits
    torch.testing.assert_close(attended.past_keys[:, :, 2:], tier_k.gather(2, chosen) + 100 * ~hit)
    torch.testing.assert_close(attended.past_values[:, :, 2:], tier_v.gather(2, chosen) + 100 * ~hit)


@pytest.mark.parametrize("proxy_dtype, proxy_bytes", [("model", 4 * 4), ("int8", 4 + 4)])
def test_tier_bytes_are_exact_and_split_by_tier(proxy_dtype, proxy_bytes):
    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    policy = Retrieval(top_k=5, recent=4, sinks=2, proxy="lrqk", rank=4, proxy_dtype=proxy_dtype)
    cache = CompressedCache(model, policy, prefill_chunk=16)
    cache.prefill(ids[:, :32])
    for t in range(32, 40):
        model(ids[:, t:t + 1], **cache_kwargs(model, cache))
    report = cache.memory_report()
    batch, heads, d, layers = 2, 2, 16, 2
    capacity = 32 + 16  # the prompt exactly, then one growth step of 16 rows for the decode steps
    host = layers * batch * heads * capacity * 2 * d * 4
    assert cache.nbytes("host") == report.host == host
    held = 7  # sinks + recent + the decode step's new token
    slots = batch * heads * held * (2 * d * 4 + 4 + 1)
    proxy = batch * heads * capacity * (proxy_bytes + 1)  # rank-4 proxy (fp32, or int8 + fp32 scale) + validity
    working = batch * heads * 5 * (2 * d * 4 + 8)  # rows + int64 token index
    basis = batch * heads * d * 4 * 4
    assert cache.nbytes() == layers * (slots + proxy + working + basis + batch * 4)
    assert cache.nbytes("all") == cache.nbytes() + host
    assert "host tier holds" in report.tables()[-1].caption
    stats = cache.retrieval_stats()
    assert stats["decode_steps"] == 8 and 0 <= stats["hit_rate"] <= 1
    assert stats["bytes_per_step"] == stats["rows_per_step"] * 2 * d * 4
    with pytest.raises(ValueError, match="'device', 'host' or 'all'"):
        cache.nbytes("gpu")


def test_left_padded_batch_equals_rows_alone_and_generate_runs_beams_and_sampling():
    model = make_tiny_model("llama")
    policy = Retrieval(top_k=3, recent=4, sinks=2, proxy="lrqk", rank=4)
    a = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(5))
    b = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(6))
    batch = torch.cat([torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1), a])
    mask = torch.ones_like(batch)
    mask[0, :6] = 0
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **cache_kwargs(model, CompressedCache(model, policy)), **gen)
    alone_b = model.generate(b, **cache_kwargs(model, CompressedCache(model, policy)), **gen)
    alone_a = model.generate(a, **cache_kwargs(model, CompressedCache(model, policy)), **gen)
    assert torch.equal(together[0, 6:], alone_b[0]) and torch.equal(together[1], alone_a[0])
    beams = model.generate(a, num_beams=2, num_return_sequences=2,
                           **cache_kwargs(model, CompressedCache(model, policy)), **gen)
    sampled = model.generate(a, do_sample=True, max_new_tokens=4, pad_token_id=0,
                             **cache_kwargs(model, CompressedCache(model, policy)))
    assert beams.shape == (2, 36) and sampled.shape == (1, 34)


def test_int8_proxy_scores_are_the_float_ones_within_rounding():
    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(9))
    caches = {dt: CompressedCache(model, Retrieval(top_k=4, recent=4, sinks=2, rank=8, proxy_dtype=dt))
              for dt in ("model", "int8")}
    for cache in caches.values():
        cache.prefill(ids)
        cache.finalize()
    exact, quantized = caches["model"].layers[1].tier, caches["int8"].layers[1].tier
    assert quantized.proxy.dtype == torch.int8
    restored = quantized.proxy.float() * quantized.proxy_scale[..., None]
    error = (restored - exact.proxy).abs().amax(-1) / exact.proxy.abs().amax(-1)
    assert 0 < error.max() <= 0.5 / 127 + 1e-6  # half a step of the row's scale, at most


def test_kv_fraction_sizes_top_k_by_device_bytes():
    model = make_tiny_model("llama")
    d = 16
    policy = Retrieval(kv_fraction=0.25, context=512, rank=2, sinks=2, recent=4, proxy="lrqk")
    cache = CompressedCache(model, policy)
    # (0.25 * 512 * 2d - 512 * rank) / 2d rows of keys and values, less the sinks and recent tokens held
    assert cache.layers[0].tier.top_k == (0.25 * 512 * 2 * d - 512 * 2) // (2 * d) - 6 == 90
    (preset,) = parse_policy("retrieval-25").build(context=512)
    assert (preset.kv_fraction, preset.rank, preset.recent, preset.proxy_dtype) == (0.25, 512 // 16, 32, "int8")
    with pytest.raises(ValueError, match="wider than llama's 16-channel heads; use rank <= 16"):
        CompressedCache(model, preset)
    # a 16-channel int8 proxy (20 bytes) is 15.6% of dense on 16-channel float32 heads (128 bytes): no room left
    with pytest.raises(ValueError, match="the proxy alone takes 15.6% of dense"):
        CompressedCache(model, Retrieval(kv_fraction=0.1, context=512, rank=16, proxy_dtype="int8"))


@pytest.mark.parametrize("knobs, match", [
    ({"top_k": 0}, "positive"), ({"proxy": "pca"}, "proxy"), ({"offload": "disk"}, "offload"),
    ({"kv_fraction": 0.25}, "go together"), ({"rank": 99, "proxy": "lrqk"}, "wider than"),
    ({"proxy_dtype": "int4"}, "proxy_dtype"), ({"offload": "gpu"}, "offload"),
])
def test_bad_knobs_are_refused(knobs, match):
    with pytest.raises(ValueError, match=match):
        CompressedCache(make_tiny_model("llama"), Retrieval(**knobs))


def test_a_one_token_prompt_then_decoding():
    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(7))
    want = _run(model, DynamicCache(), ids, 1)
    got = _run(model, CompressedCache(model, Retrieval(top_k=32, recent=2, sinks=1, proxy="lrqk", rank=2)), ids, 1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_offload_none_in_toml_is_the_resident_tier():
    (policy,) = parse_policy("retrieval:top_k=8,recent=4,sinks=2,rank=4,offload=none").build()
    assert policy.offload is None


def test_static_decoding_is_one_graph_and_counts_the_rows_it_reads():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = make_tiny_model("llama")
    cache = CompressedCache(model, Retrieval(top_k=3, recent=4, sinks=2, proxy="lrqk", rank=4), prefill_chunk=8)
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    generate_static(model, cache, ids, 6, step=compiled_step(mode=None, backend="eager"))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    stats = cache.retrieval_stats()
    heads = model.config.num_key_value_heads
    # every step has more than 3 candidates (20+ tokens seen, 6 held): each reads 3 rows per sequence and KV head
    assert stats["decode_steps"] == 5 and stats["hit_rate"] == 0
    assert stats["rows_per_step"] == len(cache.layers) * 2 * heads * 3
    assert all(layer.tier.capacity == 25 for layer in cache.layers)  # every step's row allocated once


def test_a_static_step_past_the_allocated_rows_fails_before_changing_the_cache():
    model = make_tiny_model("llama")
    cache = CompressedCache(model, Retrieval(top_k=3, recent=4, sinks=2, proxy="lrqk", rank=4), prefill_chunk=8)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache.prefill(ids)
        cache.make_static(1)
        mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
        step = {"position_ids": torch.tensor([[12]]), "attention_mask": mask, **cache_kwargs(model, cache)}
        model(ids[:, :1], **step)  # the one step the tier has a row for
        before = [layer.slots.keys.clone() for layer in cache.layers]
        with pytest.raises((IndexError, RuntimeError), match="index"):
            model(ids[:, 1:2], **{**step, "position_ids": torch.tensor([[13]])})
    assert int(cache.layers[0].seen) == 13
    assert torch.equal(cache.layers[0].slots.keys, before[0])


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", ["plain", "window", "aqua", "softcap"])
def test_a_chunk_streams_the_tier_and_equals_attention_over_every_earlier_token(backend, case, monkeypatch):
    """A chunk over held slots + the tier's earlier rows (in blocks, merged by log-sum-exp) equals one softmax."""
    if backend == "triton":
        pytest.importorskip("triton")
        if case == "softcap":
            pytest.skip("the kernel leaves soft-capping to the reference")
    from kvpress_aqua.ops import limits

    monkeypatch.setattr(limits, "tier_block_rows", lambda rows, row_bytes: 10)  # three blocks for 23 earlier tokens
    torch.manual_seed(1)
    batch, kv_heads, group, d, first, n = 2, 2, 2, 16, 23, 3
    window = 12 if case == "window" else None
    softcap = 5.0 if case == "softcap" else None
    basis = torch.linalg.qr(torch.randn(kv_heads, d, d)).Q[..., :12] if case == "aqua" else None
    raw_k, tier_v = torch.randn(batch, kv_heads, first + n, d) * 2, torch.randn(batch, kv_heads, first + n, d)
    stored = raw_k if basis is None else raw_k @ basis[None]  # the tier holds keys as stored
    valid = torch.ones(batch, kv_heads, first + n, dtype=torch.bool)
    valid[1, :, :4] = False  # left padding of the second row
    held_at = torch.tensor([4, 5, 21, 22])
    held = held_at.expand(batch, kv_heads, 4).int()
    tier = RetrievalInputs(tier_keys=stored, tier_values=tier_v, tier_valid=valid, proxy_keys=stored[..., :2],
                           proxy_basis=torch.zeros(kv_heads, d, 2), held_index=held, top_k=3)
    query = torch.randn(batch, kv_heads * group, n, d)
    new_mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    inputs = AttentionInputs(layer_idx=0, past_keys=stored[:, :, held_at], past_values=tier_v[:, :, held_at],
                             past_visible=valid[:, :, held_at], keys_new=raw_k[:, :, first:],
                             values_new=tier_v[:, :, first:], first_index=first, window=window,
                             past_index=held if window else None, key_basis=basis, retrieval=tier)
    if backend == "triton":
        from kvpress_aqua.ops.triton_attention import triton_attention as op
    else:
        op = reference_attention
    calls = []

    def attend(*args):
        calls.append(args[0].past_keys.shape[-2])
        return op(*args, with_lse=True)

    out, _, _ = chunk_attention(inputs, query, new_mask, d ** -0.5, softcap, attend)
    assert calls == [4, 10, 10, 3]  # the held slots, then three blocks of the tier's earlier rows
    # the oracle: every valid earlier token and the chunk in one softmax (earlier keys as stored, queries projected)
    q = query if basis is None else query.view(batch, kv_heads, group, n, d) @ basis[:, None]
    q = q.reshape(batch, kv_heads * group, n, -1)
    past_k = stored[:, :, :first].repeat_interleave(group, 1)
    s_past = q @ past_k.transpose(-1, -2) * d ** -0.5
    s_new = query @ raw_k[:, :, first:].repeat_interleave(group, 1).transpose(-1, -2) * d ** -0.5
    s = torch.cat([s_past, s_new], -1)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    index = torch.arange(first + n)
    seen = valid.repeat_interleave(group, 1)[:, :, None, :] & (index[None, :] <= (first + torch.arange(n))[:, None])
    if window:
        seen = seen & (index[None, :] > (first + torch.arange(n))[:, None] - window)
    expect = s.masked_fill(~seen, float("-inf")).softmax(-1) @ tier_v.repeat_interleave(group, 1)
    torch.testing.assert_close(out, expect, atol=2e-5, rtol=0)

"""CompressedCache: exactness against DynamicCache and against a masked full-attention reference,
exact byte accounting, generate() integration and bad input."""

import pytest
import torch
from tiny_models import make_tiny_model
from transformers import AttentionInterface, DynamicCache

from kvpress_aqua import CompressedCache
from kvpress_aqua.core.accounting import decode_slots, layer_nbytes
from kvpress_aqua.ops import reference
from kvpress_aqua.policies import H2O, TOVA, SlidingWindow
from kvpress_aqua.policies.aqua import Aqua
from kvpress_aqua.util.compat import cache_kwargs

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma", "phi3"]
TOL = 1e-4


def _logits(model, ids, cache, steps=6, **kw):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             **cache_kwargs(model, cache),
                             output_logits=True, return_dict_in_generate=True, **kw)
    return torch.stack(out.logits, 1), out.sequences


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy", [H2O(heavy=64, recent=8, sinks=2), SlidingWindow(sinks=4, window=60)],
                         ids=["h2o", "sliding"])
def test_no_eviction_equals_dynamic_cache(arch, policy):
    model = make_tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    ref, ref_seq = _logits(model, ids, DynamicCache())
    cache = CompressedCache(model, policy)
    got, seq = _logits(model, ids, cache)
    cache.detach()
    assert torch.equal(seq, ref_seq)
    assert (got - ref).abs().max().item() < TOL
    assert cache.get_seq_length() == 17 + 6 - 1


def test_no_policy_is_a_dynamic_cache_and_keeps_attention():
    model = make_tiny_model("llama")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    ref, _ = _logits(model, ids, DynamicCache())
    cache = CompressedCache(model)
    got, _ = _logits(model, ids, cache)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(got, ref)
    assert cache.nbytes() == cache.dense_nbytes()


@pytest.mark.parametrize("second_mask", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("policies", [(), (H2O(heavy=100, recent=8),)], ids=["plain", "h2o"])
def test_padded_batch_prefilled_in_two_calls_equals_one_forward(policies, second_mask):
    """Context then question, left-padded: positions and padding carry over (the plain cache too).

    Was a bug of the plain cache (no policy): real_tokens_seen counted the padding and prefill marked every
    earlier token attendable, so the question got shifted positions and attended the context's padding.
    """
    model = make_tiny_model("llama")
    gen = torch.Generator().manual_seed(10)
    rows = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (14, 6)]
    ids, mask = _left_pad(rows, pad_id=0)  # row 1: 8 padding tokens, all in the context
    split = 10
    with torch.no_grad():
        position = (mask.cumsum(-1) - 1).clamp_min(0)
        want = model(ids, attention_mask=mask, position_ids=position, **cache_kwargs(model, DynamicCache()))
        cache = CompressedCache(model, *policies)
        cache.prefill(ids[:, :split], mask[:, :split])
        assert cache.real_tokens_seen().tolist() == [split, split - 8]
        got = cache.prefill(ids[:, split:], mask[:, split:] if second_mask else None)
        assert cache.real_tokens_seen().tolist() == [14, 6]
    cache.detach()
    assert (got - want.logits[:, -1]).abs().max().item() < TOL


# ---------------------------------------------------------------- eviction is exact
_VISIBLE: dict = {}


def _masked_reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Full attention where query t of layer l, KV head h sees exactly the tokens _VISIBLE[l][t][b, h]."""
    allowed = _VISIBLE[module.layer_idx]  # bool (batch, kv_heads, q, k)
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, 1)
    v = value.repeat_interleave(group, 1)
    scores = (query @ k.transpose(-1, -2)) * scaling
    mask = allowed.repeat_interleave(group, 1)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return (scores.softmax(-1) @ v).transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize(
    "policy,chunk",
    [(H2O(heavy=6, recent=3, sinks=1), None), (SlidingWindow(sinks=2, window=7), None), (H2O(heavy=5, recent=2), 6),
     (TOVA(heavy=6, recent=2, sinks=1), 6)],
    ids=["h2o", "sliding", "h2o-chunked", "tova-chunked"],
)
def test_eviction_equals_masked_full_attention(arch, policy, chunk, monkeypatch):
    """Logits of every step equal a full-attention forward that hides exactly the evicted tokens."""
    model = make_tiny_model(arch)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, model.config.vocab_size, (2, 20), generator=gen)
    cache = CompressedCache(model, policy, prefill_chunk=chunk)
    total_steps = 8
    step_logits, tokens = [], prompt
    seq_len = prompt.shape[1] + total_steps
    visible = {i: torch.zeros(2, model.config.num_key_value_heads, seq_len, seq_len, dtype=torch.bool)
               for i in range(model.config.num_hidden_layers)}
    real_attention = reference.reference_attention

    def record(inputs, query, *args):
        # what queries first..first+n-1 of this call see: the visible held past plus the chunk up to themselves
        layer = cache.layers[inputs.layer_idx]
        past = inputs.past_keys.shape[-2]
        index = layer.index[..., :past].long()
        held = torch.zeros(2, layer.num_kv_heads, seq_len, dtype=torch.int32)
        held.scatter_add_(2, index.clamp_min(0), (inputs.past_visible & (index >= 0)).int())
        first = inputs.first_index
        for t in range(first, first + query.shape[-2]):
            visible[inputs.layer_idx][:, :, t, : t + 1] = (held[:, :, : t + 1] > 0) | (torch.arange(t + 1) >= first)
        return real_attention(inputs, query, *args)

    monkeypatch.setattr(reference, "reference_attention", record)
    with torch.no_grad():
        if chunk is None:
            logits = model(prompt, **cache_kwargs(model, cache)).logits[:, -1]
        else:
            for lo in range(0, prompt.shape[1], chunk):
                hi = min(lo + chunk, prompt.shape[1])
                logits = model(prompt[:, lo:hi], **cache_kwargs(model, cache)).logits[:, -1]
        for step in range(total_steps):
            step_logits.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], 1)
            if step == total_steps - 1:
                break
            logits = model(nxt, **cache_kwargs(model, cache)).logits[:, -1]
            held = [int(layer.valid.sum(-1).max()) for layer in cache.layers]
            assert max(held) <= policy.budget + 1

    cache.detach()
    # the compressed run really evicted something
    assert int(cache.layers[0].valid.sum(-1).max()) < tokens.shape[1] - 1
    AttentionInterface.register("test_masked_reference", _masked_reference_attention)
    model.set_attn_implementation("test_masked_reference")
    try:
        n = tokens.shape[1] - 1
        for i in visible:
            _VISIBLE[i] = visible[i][:, :, :n, :n]
        with torch.no_grad():
            ref = model(tokens[:, :n]).logits
    finally:
        model.set_attn_implementation("sdpa")
    got = torch.stack(step_logits, 1)
    want = ref[:, prompt.shape[1] - 1:]
    assert (got - want).abs().max().item() < TOL


# ------------------------------------------------------------- memory accounting
def test_nbytes_is_exact_and_storage_is_released():
    model = make_tiny_model("llama")
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(4))
    policy = H2O(heavy=10, recent=5, sinks=1)
    cache = CompressedCache(model, policy)
    _logits(model, ids, cache, steps=5)
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values, layer.index, layer.valid, layer.score, layer.left_pad):
            # held tensors own their storage: no view into a larger, freed-looking buffer
            assert t.untyped_storage().nbytes() == t.nbytes
            total += t.nbytes
    assert cache.nbytes() == total
    cfg = model.config
    slots = decode_slots(policy.budget, cache.get_seq_length(), prompt=40)
    per_layer = layer_nbytes(3, cfg.num_key_value_heads, slots, cfg.head_dim, cfg.head_dim, 4,
                             compressed=True, needs_scores=True)
    assert total == per_layer * cfg.num_hidden_layers
    dense = DynamicCache()
    _logits(model, ids, dense, steps=5)
    assert cache.dense_nbytes() == sum(layer.keys.nbytes + layer.values.nbytes for layer in dense.layers)
    assert cache.nbytes() < cache.dense_nbytes()


def test_held_never_exceeds_budget_plus_chunk():
    model = make_tiny_model("llama")
    policy = SlidingWindow(sinks=2, window=14)
    cache = CompressedCache(model, policy, prefill_chunk=8)
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(5))
    sizes = []
    real_update = cache.layers[0].update

    def spy(k, v, *a, **kw):
        out = real_update(k, v, *a, **kw)
        sizes.append(out[0].shape[-2])
        return out

    cache.layers[0].update = spy
    cache.prefill(ids)
    assert cache.get_seq_length() == 50
    assert max(sizes) <= policy.budget + 8


# ------------------------------------------------------------ generate integration
def _left_pad(rows, pad_id):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("policy", [H2O(heavy=6, recent=4, sinks=2), SlidingWindow(sinks=2, window=8)],
                         ids=["h2o", "sliding"])
def test_left_padded_batch_equals_single_rows(policy):
    model = make_tiny_model("llama")
    gen = torch.Generator().manual_seed(6)
    rows = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (25, 14, 19)]
    ids, mask = _left_pad(rows, pad_id=0)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                 **cache_kwargs(model, CompressedCache(model, policy)), output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
        for i, r in enumerate(rows):
            single = model.generate(torch.tensor([r]), max_new_tokens=8, do_sample=False,
                                    **cache_kwargs(model, CompressedCache(model, policy)), output_logits=True,
                                    return_dict_in_generate=True, pad_token_id=0)
            a = torch.stack(batched.logits, 1)[i]
            b = torch.stack(single.logits, 1)[0]
            assert (a - b).abs().max().item() < TOL


def test_padding_is_never_kept():
    model = make_tiny_model("llama")
    rows = [list(range(5, 40)), list(range(5, 12))]
    ids, mask = _left_pad(rows, pad_id=0)
    cache = CompressedCache(model, H2O(heavy=6, recent=2, sinks=1))
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **cache_kwargs(model, cache),
                       pad_token_id=0)
    pads = ids.shape[1] - len(rows[1])
    for layer in cache.layers:
        kept = layer.index[1][layer.valid[1]]
        assert (kept >= pads).all()
        assert int(layer.left_pad[1]) == pads and int(layer.left_pad[0]) == 0


@pytest.mark.parametrize("mode", ["sample", "beam", "num_return"])
def test_generate_modes(mode):
    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(7))
    kw = {"sample": dict(do_sample=True, top_k=20),
          "beam": dict(num_beams=3, do_sample=False),
          "num_return": dict(do_sample=True, num_return_sequences=2)}[mode]
    cache = CompressedCache(model, H2O(heavy=8, recent=4))
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, **cache_kwargs(model, cache),
                             pad_token_id=0, **kw)
    rows = 4 if mode == "num_return" else 2
    assert out.shape == (rows, 36)
    batch = cache.layers[0].keys.shape[0]
    assert all(t.shape[0] == batch for layer in cache.layers for t in layer._tensors().values())


def test_beam_search_without_eviction_matches_dynamic_cache():
    model = make_tiny_model("qwen2")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = model.generate(ids, num_beams=3, max_new_tokens=6, do_sample=False, **cache_kwargs(model, DynamicCache()))
        got = model.generate(ids, num_beams=3, max_new_tokens=6, do_sample=False,
                             **cache_kwargs(model, CompressedCache(model, H2O(heavy=60, recent=4))))
    assert torch.equal(ref, got)


def test_context_reuse_processes_only_new_tokens():
    model = make_tiny_model("llama")
    gen = torch.Generator().manual_seed(9)
    context = torch.randint(3, 128, (1, 30), generator=gen)
    question = torch.randint(3, 128, (1, 5), generator=gen)
    full = torch.cat([context, question], 1)
    cache = CompressedCache(model, H2O(heavy=100, recent=8))
    with torch.no_grad():
        model(context, **cache_kwargs(model, cache))
        assert cache.get_seq_length() == 30
        got = model.generate(full, **cache_kwargs(model, cache), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    ref, _ = _logits(model, full, DynamicCache(), steps=4)
    assert cache.get_seq_length() == 35 + 3
    assert (torch.stack(got.logits, 1) - ref).abs().max().item() < TOL


# ------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make", [lambda: H2O(heavy=-1, recent=4), lambda: H2O(heavy=0, recent=0),
                                  lambda: SlidingWindow(sinks=4, window=0), lambda: SlidingWindow(sinks=-1)])
def test_bad_policy_sizes(make):
    with pytest.raises(ValueError):
        make()


def test_bad_cache_arguments():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="prefill_chunk"):
        CompressedCache(model, H2O(heavy=4, recent=4), prefill_chunk=0)
    with pytest.raises(ValueError, match="at most one token policy"):
        CompressedCache(model, H2O(heavy=4, recent=4), SlidingWindow())
    with pytest.raises(ValueError, match="not a policy"):
        CompressedCache(model, "h2o")


def test_sinks_must_fit_model_window():
    model = make_tiny_model("mistral", sliding_window=4)
    with pytest.raises(ValueError, match="sinks"):
        CompressedCache(model, SlidingWindow(sinks=8, window=16))


def test_batch_size_change_is_refused_without_damage():
    model = make_tiny_model("llama")
    cache = CompressedCache(model, H2O(heavy=8, recent=4))
    with torch.no_grad():
        model(torch.randint(3, 128, (2, 10)), **cache_kwargs(model, cache))
    before = {k: v.clone() for k, v in cache.layers[0]._tensors().items()}
    with pytest.raises(ValueError, match="batch"):
        with torch.no_grad():
            model(torch.randint(3, 128, (3, 1)), **cache_kwargs(model, cache))
    assert cache.get_seq_length() == 10
    for k, v in cache.layers[0]._tensors().items():
        assert torch.equal(v, before[k])


def test_crop_is_refused():
    model = make_tiny_model("llama")
    cache = CompressedCache(model, H2O(heavy=8, recent=4))
    with torch.no_grad():
        model(torch.randint(3, 128, (1, 10)), **cache_kwargs(model, cache))
    with pytest.raises(ValueError, match="cropped"):
        cache.crop(-2)


def test_unsupported_model_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32))
    type(model)._supports_attention_backend = False
    try:
        with pytest.raises(ValueError, match="gpt2"):
            CompressedCache(model, H2O(heavy=8, recent=4))
    finally:
        type(model)._supports_attention_backend = True


def test_detach_restores_attention_and_fallback_is_exact():
    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
        cache = CompressedCache(model, H2O(heavy=8, recent=4))
        assert model.config._attn_implementation == "kvpress_aqua"
        # the model run without our cache falls back to standard attention
        assert (model(ids).logits - ref).abs().max().item() < TOL
    cache.detach()
    assert model.config._attn_implementation == "sdpa"


def test_import_patches_nothing():
    import importlib

    import kvpress_aqua

    before = dict(AttentionInterface._global_mapping)
    importlib.reload(kvpress_aqua)
    assert dict(AttentionInterface._global_mapping).keys() == before.keys()


def test_tova_scores_are_the_latest_call_only_and_h2o_accumulates():
    """TOVA's held scores are exactly the mass of the last attention call; H2O's are the running sum."""
    model = make_tiny_model("llama")
    prompt = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(9))
    caches = {name: CompressedCache(model, policy) for name, policy in
              [("tova", TOVA(heavy=50, recent=2)), ("h2o", H2O(heavy=50, recent=2))]}
    masses = {}
    for name, cache in caches.items():
        layer = cache.layers[0]
        seen = []
        original = layer._fold

        def spy(inputs, new_slots, original=original, seen=seen, layer=layer):
            before = layer.score.clone()
            original(inputs, new_slots)
            fresh = torch.zeros_like(before)
            fresh[..., :inputs.mass_past.shape[-1]] = inputs.mass_past
            seen.append((before, layer.score.clone(), fresh.scatter_add_(2, new_slots, inputs.mass_new)))

        layer._fold = spy
        with torch.no_grad():
            logits = model(prompt, **cache_kwargs(model, cache)).logits[:, -1]
            for _ in range(3):
                logits = model(logits.argmax(-1, keepdim=True), **cache_kwargs(model, cache)).logits[:, -1]
        cache.detach()
        masses[name] = seen
    for name, seen in masses.items():
        for before, after, fresh in seen[1:]:
            expected = fresh if name == "tova" else before + fresh
            assert torch.allclose(after, expected, atol=1e-6), name
            assert before.abs().sum() > 0  # the earlier calls did leave scores behind


@pytest.mark.parametrize("chunk,split", [(1, None), (None, 1), (4, 1)])
def test_padding_tokens_fed_alone_get_no_exact_row(chunk, split):
    """Padding fed as 1-token updates under AQUA's exact ring (prefill_chunk=1, or a first prefill call of one
    column): no exact row stands for it, and each row equals the row alone.

    Was a crash: ExactRows.store_one took a padding token (position -1) for a sink and scattered at row -1.
    """
    model = make_tiny_model("llama")
    gen = torch.Generator().manual_seed(9)
    rows = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (9, 4)]
    ids, mask = _left_pad(rows, pad_id=0)
    pads = ids.shape[1] - len(rows[1])

    def run(ids, mask=None, split=None):
        cache = CompressedCache(model, Aqua(k_ratio=0.5, basis="identity", exact_sinks=2, exact_recent=3),
                                prefill_chunk=chunk)
        if split is not None:
            cache.prefill(ids[:, :split], mask[:, :split])
            ids, mask = ids[:, split:], mask[:, split:]
        logits = cache.prefill(ids, mask)
        cache.finalize()
        cache.detach()
        return logits, cache

    got, cache = run(ids, mask, split)
    for layer in cache.layers:
        slot = layer.exact.slot[1]  # the padded row: every exact row points at a real token, or at nothing
        token = layer.index[1].gather(-1, slot.clamp_min(0))
        assert (token[slot >= 0] >= pads).all()
        assert (slot >= 0).any()
    for i, r in enumerate(rows):  # the row alone, fed in the pieces the batch's forwards hold of it
        pad = ids.shape[1] - len(r)
        alone_ids = torch.tensor([r])
        alone, _ = run(alone_ids, torch.ones_like(alone_ids), split - pad if split and split > pad else None)
        assert (got[i] - alone[0]).abs().max().item() < TOL

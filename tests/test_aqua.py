"""Aqua: exactness at full rank, real byte savings, stacking with eviction, per-layer split, artifact checks."""

import math

import pytest
import torch
from tiny_models import ARCHS, byte_tokenizer, make_tiny_model
from transformers import DynamicCache

from kvpress_aqua import CompressedCache, ModelInfo
from kvpress_aqua.artifacts.aqua import AquaArtifact
from kvpress_aqua.calibration import calibrate
from kvpress_aqua.core.accounting import layer_nbytes
from kvpress_aqua.ops.reference import top_channels
from kvpress_aqua.policies import H2O
from kvpress_aqua.policies.aqua import CHANNEL_MULTIPLE, Aqua, smallest_key_width
from kvpress_aqua.util.compat import cache_kwargs

TEXT = "A lighthouse keeper counts the ships that pass the harbour each night and logs the weather. " * 10


def _artifact(model):
    return calibrate(model, byte_tokenizer(model.config.vocab_size), TEXT, tokens=400, chunk=128, progress=False)


def _logits(model, ids, cache, steps=5):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             **cache_kwargs(model, cache),
                             output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits, 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_is_exact(arch):
    model = make_tiny_model(arch)
    ids = torch.randint(3, 128, (2, 19), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids, DynamicCache())
    cache = CompressedCache(model, Aqua(k_ratio=1.0, artifact=_artifact(model)))
    got = _logits(model, ids, cache)
    cache.detach()
    assert (got - ref).abs().max().item() < 1e-4


def test_stacks_with_h2o_without_knowing_it():
    model = make_tiny_model("llama")
    artifact = _artifact(model)
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(1))
    policy = H2O(heavy=8, recent=4, sinks=1)
    alone = _logits(model, ids, CompressedCache(model, policy))
    both = _logits(model, ids, CompressedCache(model, policy, Aqua(k_ratio=1.0, artifact=artifact)))
    assert (alone - both).abs().max().item() < 1e-4
    # half the channels pruned, every held token exact: the exact rows follow H2O's evictions and overwrites
    exact = _logits(model, ids, CompressedCache(model, policy, Aqua(k_ratio=0.5, artifact=artifact, exact_recent=64)))
    assert (alone - exact).abs().max().item() < 1e-4
    cache = CompressedCache(model, Aqua(k_ratio=0.5, artifact=artifact), policy)
    _logits(model, ids, cache)
    assert all(layer.keys.shape[-2:] == (policy.budget + 1, 8) for layer in cache.layers)
    assert all(layer.score is not None and layer.score.sum() > 0 for layer in cache.layers)


@pytest.mark.parametrize(("sinks", "recent"), [(0, 0), (2, 5)])
def test_key_bytes_really_shrink_and_accounting_is_exact(sinks, recent):
    model = make_tiny_model("qwen2")
    cfg = model.config
    ids = torch.randint(3, 128, (3, 25), generator=torch.Generator().manual_seed(2))
    aqua = Aqua(k_ratio=0.5, artifact=_artifact(model), exact_sinks=sinks, exact_recent=recent)
    cache = CompressedCache(model, aqua)
    _logits(model, ids, cache, steps=4)
    seen = cache.get_seq_length()
    d, r, exact = cfg.head_dim, round(0.5 * cfg.head_dim), sinks + recent
    for layer in cache.layers:
        assert layer.keys.shape == (3, cfg.num_key_value_heads, seen, r)
        assert layer.keys.untyped_storage().nbytes() == layer.keys.nbytes
        assert (layer.exact is None) == (exact == 0)
    projections = cfg.num_hidden_layers * cfg.num_key_value_heads * d * (d if exact else r) * 4
    assert aqua.nbytes() == projections
    per_layer = layer_nbytes(3, cfg.num_key_value_heads, seen, r, d, 4, compressed=True, exact_tokens=exact,
                           residual_dim=d - r)
    assert cache.nbytes() == per_layer * cfg.num_hidden_layers + projections
    kinds = cache.memory_report().by_kind()
    residual_bytes = cfg.num_hidden_layers * 3 * cfg.num_key_value_heads * exact * (d - r) * 4
    assert kinds["keys"] == kinds["values"] // 2 + residual_bytes


def test_query_selection_keeps_top_channels():
    """q_ratio keeps ceil(q_ratio * r) channels of each projected query: the largest, unchanged."""
    model = make_tiny_model("llama")
    aqua = Aqua(k_ratio=1.0, q_ratio=0.5, artifact=_artifact(model))
    aqua.bind(ModelInfo.from_config(model.config), torch.device("cpu"), torch.float32)
    assert aqua.query_channels(0) == math.ceil(0.5 * 16)
    full = Aqua(k_ratio=1.0, artifact=aqua.artifact)
    full.bind(ModelInfo.from_config(model.config), torch.device("cpu"), torch.float32)
    assert full.query_channels(0) is None
    q = torch.randn(2, 2, 2, 3, 16) @ aqua.key_basis(0)[:, None]  # (batch, kv_heads, group, seq, r)
    projected = top_channels(q, aqua.query_channels(0))
    assert ((projected != 0).sum(-1) == math.ceil(0.5 * 16)).all()
    kept = projected != 0
    assert torch.allclose(projected[kept], q[kept])
    assert (q.abs().masked_fill(kept, 0).amax(-1) <= q.abs().masked_fill(~kept, math.inf).amin(-1)).all()
    assert torch.equal(top_channels(q, None), q)


def test_spectrum_split_keeps_the_total_and_favours_flat_spectra():
    layers, heads, d = 4, 2, 64
    decay = torch.tensor([0.5, 0.9, 0.99, 0.7])  # layer 2 has the flattest spectrum
    spectrum = decay[:, None, None] ** torch.arange(d)[None, None, :].float()
    spectrum = spectrum.expand(layers, heads, d)
    artifact = AquaArtifact(projections=torch.eye(d).expand(layers, heads, d, d), spectrum=spectrum,
                            query_norms=torch.ones(layers, heads, d), key_norms=torch.ones(layers, heads, d),
                            metadata={})
    info = ModelInfo("llama", layers, 4, heads, d, None, ("full_attention",) * layers, "x", "f")
    dims = Aqua(k_ratio=0.5, per_layer="spectrum", basis="identity")._split(info, artifact)
    assert sum(dims) == layers * 32
    assert all(r % CHANNEL_MULTIPLE == 0 and r >= CHANNEL_MULTIPLE for r in dims)
    assert dims[2] == max(dims) and dims[0] == min(dims)


def test_think_basis_selects_raw_channels():
    model = make_tiny_model("llama")
    artifact = _artifact(model)
    aqua = Aqua(k_ratio=0.5, basis="think", artifact=artifact)
    aqua.bind(ModelInfo.from_config(model.config), torch.device("cpu"), torch.float32)
    p = aqua.key_basis(0)[0]  # (head_dim, r) columns of the identity
    assert torch.equal(p.sum(0), torch.ones(8)) and set(p.unique().tolist()) == {0.0, 1.0}
    chosen = p.argmax(0)
    importance = artifact.query_norms[0, 0] * artifact.key_norms[0, 0]
    assert set(chosen.tolist()) == set(importance.topk(8).indices.tolist())


def test_artifact_of_another_model_is_refused():
    artifact = _artifact(make_tiny_model("llama"))
    other = make_tiny_model("qwen2")
    with pytest.raises(ValueError, match="kvtool calibrate"):
        CompressedCache(other, Aqua(k_ratio=0.5, artifact=artifact))
    assert other.config._attn_implementation == "sdpa"


def test_missing_artifact_names_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv("KVPRESS_AQUA_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="kvtool calibrate"):
        CompressedCache(make_tiny_model("llama"), Aqua(k_ratio=0.5))


@pytest.mark.parametrize("bad", [dict(k_ratio=0), dict(k_ratio=1.2), dict(q_ratio=0), dict(per_layer="x"),
                                 dict(basis="random"), dict(exact_sinks=-1), dict(exact_recent=2.5),
                                 dict(exact_recent=True)])
def test_bad_knobs(bad):
    with pytest.raises(ValueError):
        Aqua(**bad)


# ------------------------------------------------------------------------------- exact tokens
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("sinks", "recent"), [(0, 64), (64, 0), (64, 1)], ids=["recent", "sinks", "sinks-decoded"])
def test_exact_tokens_covering_the_past_make_pruned_keys_exact(arch, sinks, recent):
    """Every past token exact (as sink or as recent) gives back full attention from half the channels."""
    model = make_tiny_model(arch)
    # "sinks-decoded": a 1-token prompt, so that most sinks arrive one decode step at a time
    ids = torch.randint(3, 128, (2, 1 if recent == 1 else 19), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids, DynamicCache(), steps=12)
    aqua = Aqua(k_ratio=0.5, artifact=_artifact(model), exact_sinks=sinks, exact_recent=recent)
    pruned = _logits(model, ids, CompressedCache(model, Aqua(k_ratio=0.5, artifact=aqua.artifact,
                                                              exact_sinks=0, exact_recent=0)), steps=12)
    cache = CompressedCache(model, aqua)
    got = _logits(model, ids, cache, steps=12)
    cache.detach()
    assert all(layer.keys.shape[-1] == 8 for layer in cache.layers)
    assert (got - ref).abs().max().item() < 1e-4
    if ids.shape[1] > 1:  # (from one prompt token, pruning alone barely moves gemma's random logits)
        assert (pruned - ref).abs().max().item() > 2e-4  # pruning alone is not exact here


def test_exact_tokens_with_a_spectrum_split_that_keeps_a_whole_layer():
    """k_ratio 0.75 over 2 layers of 16 channels: one layer keeps 16 (no residual), the other 8."""
    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (2, 19), generator=torch.Generator().manual_seed(0))
    ref = _logits(model, ids, DynamicCache())
    cache = CompressedCache(model, Aqua(k_ratio=0.75, per_layer="spectrum", artifact=_artifact(model), exact_recent=64))
    got = _logits(model, ids, cache)
    assert sorted(layer.keys.shape[-1] for layer in cache.layers) == [8, 16]
    assert (got - ref).abs().max().item() < 1e-4


def test_left_padded_batch_with_exact_tokens_equals_single_rows():
    """Sinks are the first *real* tokens of each row: a left-padded batch matches each row run alone."""
    model = make_tiny_model("llama")
    aqua = Aqua(k_ratio=0.5, artifact=_artifact(model), exact_sinks=2, exact_recent=3)
    gen = torch.Generator().manual_seed(6)
    rows = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (25, 14, 19)]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **cache_kwargs(model, CompressedCache(model, aqua)),
                                 **kwargs)
        for i, r in enumerate(rows):
            single = model.generate(torch.tensor([r]), **cache_kwargs(model, CompressedCache(model, aqua)), **kwargs)
            assert (torch.stack(batched.logits, 1)[i] - torch.stack(single.logits, 1)[0]).abs().max() < 1e-4


@pytest.mark.parametrize("evict", [False, True], ids=["aqua", "h2o+aqua"])
def test_residual_rows_hold_the_dropped_channels_of_sinks_and_recent_tokens(evict):
    """Row contents are the raw keys' dropped channels; each row's slot holds its token, or -1 once evicted."""
    model = make_tiny_model("qwen3")
    sinks, recent = 3, 5
    aqua = Aqua(k_ratio=0.5, artifact=_artifact(model), exact_sinks=sinks, exact_recent=recent)
    policies = (H2O(heavy=6, recent=3, sinks=1), aqua) if evict else (aqua,)
    ids = torch.randint(3, 128, (1, 23), generator=torch.Generator().manual_seed(4))
    cache = CompressedCache(model, *policies, prefill_chunk=6)
    raw: dict[int, list[torch.Tensor]] = {}  # the post-RoPE keys each layer was given, chunk by chunk
    for layer in cache.layers:
        def spy(keys, values, *args, layer=layer, update=layer.update, **kwargs):
            raw.setdefault(layer.layer_idx, []).append(keys)
            return update(keys, values, *args, **kwargs)
        layer.update = spy
    cache.prefill(ids[:, :20])
    with torch.no_grad():
        for t in range(20, 23):
            model(ids[:, t:t + 1], **cache_kwargs(model, cache))
    cache.finalize()  # the last layer folds its last attention call in at its next update, or when asked
    tokens = list(range(sinks)) + [None] * recent  # the token each row stands for
    for i in range(23 - recent, 23):
        tokens[sinks + i % recent] = i
    evicted = 0
    for layer_idx, layer in enumerate(cache.layers):
        dropped = aqua.residual_keys(layer_idx, torch.cat(raw[layer_idx], dim=-2))
        for row, token in enumerate(tokens):
            for head in range(layer.num_kv_heads):
                if ((layer.index[0, head] == token) & layer.valid[0, head]).any():
                    slot = int(layer.exact.slot[0, head, row])
                    assert layer.index[0, head, slot] == token and layer.valid[0, head, slot]
                    assert torch.allclose(layer.exact.keys[0, head, row], dropped[0, head, token], atol=1e-6)
                else:  # evicted: the row is blank (zeros, slot -1), so it adds nothing
                    assert not layer.exact.keys[0, head, row].any() and int(layer.exact.slot[0, head, row]) == -1
                    evicted += 1
    assert (evicted > 0) == evict


@pytest.mark.parametrize("basis", ["identity", "svd"])
def test_fewer_than_the_smallest_width_is_refused_with_the_reason(basis):
    model = make_tiny_model("llama")  # head_dim 16, a test-size head: at least 4 channels
    artifact = _artifact(model) if basis == "svd" else None
    with pytest.raises(ValueError, match=r"Aqua\(k_ratio=0.01\) keeps 1 of the 16 key channels .* smallest width is "
                                         r"4 channels \(k_ratio >= 0.25 here\): channels are split in blocks of 8"):
        CompressedCache(model, Aqua(k_ratio=0.01, basis=basis, artifact=artifact))
    assert model.config._attn_implementation == "sdpa"
    cache = CompressedCache(model, Aqua(k_ratio=0.25, basis=basis, artifact=artifact))
    assert {cache.channel_policy.key_dim(i) for i in range(2)} == {4}


def test_a_real_head_keeps_at_least_eight_channels():
    assert [smallest_key_width(d) for d in (8, 16, 32, 64, 128, 256)] == [2, 4, 8, 8, 8, 8]
    model = make_tiny_model("llama", head_dim=64)
    with pytest.raises(ValueError, match=r"keeps 6 of the 64 key channels .* smallest width is 8 channels \(k_ratio "
                                         r">= 0.125 here\)"):
        CompressedCache(model, Aqua(k_ratio=0.1, basis="identity"))
    assert CompressedCache(model, Aqua(k_ratio=0.125, basis="identity")).channel_policy.key_dim(0) == 8

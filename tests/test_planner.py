"""kvtool plan: size parsing, model resolution, the memory model against kvpress_aqua.core.accounting and the
measured cache, the quality sources, the "does not fit" analysis, presets and the command line."""

import dataclasses
import functools
import json
import types
from unittest import mock

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from kvpress_aqua.artifacts.aqua import AquaArtifact
from kvpress_aqua.cli import main
from kvpress_aqua.core.accounting import decode_slots, dense_layer_tokens, layer_nbytes
from kvpress_aqua.planner import model_shape
from kvpress_aqua.planner import quality as quality_model
from kvpress_aqua.planner.search import (
    CHUNK_CHOICES,
    MemoryModel,
    QualityModel,
    candidate_key_dims,
    count_parameters,
    offline_models,
    plan,
    plannable_token_policies,
    resolve_model,
)
from kvpress_aqua.policies import registry
from kvpress_aqua.policies.registry import POLICY_TYPES, policy_names, policy_type, token_entry
from kvpress_aqua.presets.spec import PolicySpec, parse_policy
from kvpress_aqua.util.compat import cache_kwargs
from kvpress_aqua.util.sizes import format_bytes, parse_size, parse_tokens

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, head_dim=32, pad_token_id=0, eos_token_id=1, bos_token_id=1, max_position_embeddings=512)
TINY_ARCHS = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "mistral": {"sliding_window": 16},
    "gemma2": {"sliding_window": 12},
    "gemma3_text": {"sliding_window": 10, "num_hidden_layers": 6},  # layers 0-4 sliding, 5 full
    "phi3": {"sliding_window": 20},
    "llama-mqa": {"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True},
}


def tiny_config(arch):
    model_type = arch.split("-")[0]
    return AutoConfig.for_model(model_type, **{**TINY, **TINY_ARCHS[arch]})


def tiny_model(arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


@pytest.fixture
def no_artifacts(monkeypatch, tmp_path):
    """An empty kvpress-aqua cache: no AQUA artifact is found, so the default quality curve is used."""
    monkeypatch.setenv("KVPRESS_AQUA_CACHE", str(tmp_path / "cache"))


def run_cli(capsys, *argv):
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("text,expected", [
    ("8GB", 8 * 10**9), ("24GiB", 24 * 2**30), ("1.5 TB", 1_500_000_000_000), ("512MiB", 512 * 2**20),
    ("100000000", 100_000_000), ("8 gb", 8 * 10**9), ("1kB", 1000), ("0.5KiB", 512), ("64B", 64), (4096, 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,hint", [
    ("8G", "ambiguous"), ("abc", "'8GB'"), ("-1GB", "'8GB'"), ("0", "positive"), ("1.2.3GB", "'8GB'"), ("", "'8GB'"),
    ("12 parsecs", "'8GB'"),
])
def test_parse_size_errors_name_the_string_and_an_example(text, hint):
    with pytest.raises(ValueError) as err:
        parse_size(text)
    assert repr(text) in str(err.value) and hint in str(err.value)


@pytest.mark.parametrize("text,expected", [("128k", 131072), ("128K", 131072), ("1.5k", 1536), ("8192", 8192),
                                           ("1M", 2**20), (7, 7)])
def test_parse_tokens_k_is_1024(text, expected):
    assert parse_tokens(text) == expected


@pytest.mark.parametrize("text", ["0", "12x", "-5", "k", "1e5"])
def test_parse_tokens_errors(text):
    with pytest.raises(ValueError, match="128k"):
        parse_tokens(text)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(8 * 10**9) == "7.45 GiB"
    assert format_bytes(8 * 10**9, binary=False) == "8.00 GB"
    assert format_bytes(3 * 2**40) == "3.00 TiB"


# ------------------------------------------------------------------------------------------ models
def test_offline_table_by_short_name_hub_id_and_alias():
    by_short = resolve_model("llama-3.1-8b")
    by_hub = resolve_model("meta-llama/Llama-3.1-8B-Instruct")
    by_case = resolve_model("META-LLAMA/llama-3.1-8b-instruct")
    assert by_short.info.num_layers == by_hub.info.num_layers == by_case.info.num_layers == 32
    assert (by_hub.info.num_heads, by_hub.info.num_kv_heads, by_hub.info.head_dim) == (32, 8, 128)
    assert by_hub.parameters == 8_030_261_248  # the published count
    assert "offline table" in by_hub.source and by_hub.dtype == "bfloat16"
    smol = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (smol.info.num_layers, smol.hidden_size, smol.info.num_heads, smol.info.num_kv_heads) == (30, 576, 9, 3)
    assert smol.tie_word_embeddings and smol.parameters == 134_515_008
    assert smol.max_position_embeddings == 8192


def test_offline_table_covers_the_popular_families():
    names = set(offline_models())
    assert {"llama-3.1-8b", "llama-3.1-70b", "llama-3.2-1b", "llama-3.2-3b", "qwen2.5-7b", "qwen3-8b",
            "mistral-7b-v0.3", "gemma-2-9b", "gemma-3-12b", "phi-3-mini-4k", "smollm2-135m", "smollm2-360m",
            "smollm2-1.7b"} <= names
    billions = {name: resolve_model(name).parameters / 1e9 for name in names}
    published = {"llama-3.1-70b": 70.55, "llama-3.2-1b": 1.24, "llama-3.2-3b": 3.21, "qwen2.5-7b": 7.62,
                 "qwen3-8b": 8.19, "mistral-7b-v0.3": 7.25, "gemma-2-9b": 9.24, "phi-3-mini-4k": 3.82,
                 "smollm2-360m": 0.362, "smollm2-1.7b": 1.71}
    for name, count in published.items():
        assert billions[name] == pytest.approx(count, rel=0.01), name


def test_hybrid_and_sliding_layers_from_the_table():
    gemma3 = resolve_model("google/gemma-3-12b-it").info
    sliding = [gemma3.is_sliding(i) for i in range(gemma3.num_layers)]
    assert gemma3.sliding_window == 1024 and sum(sliding) == 40
    assert sliding[:6] == [True] * 5 + [False]
    gemma2 = resolve_model("gemma-2-9b").info
    assert [gemma2.is_sliding(i) for i in range(4)] == [True, False, True, False]
    phi3 = resolve_model("microsoft/Phi-3-mini-4k-instruct").info
    assert phi3.sliding_window == 2047 and all(phi3.is_sliding(i) for i in range(phi3.num_layers))
    assert resolve_model("mistral-7b-v0.3").info.sliding_window is None


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_parameter_count_equals_the_built_model(arch):
    model = tiny_model(arch)
    assert count_parameters(model.config)[0] == sum(p.numel() for p in model.parameters())


def test_local_folder_and_config_file(tmp_path):
    data = tiny_config("gemma2").to_dict()
    (tmp_path / "config.json").write_text(json.dumps(data))
    by_dir = resolve_model(tmp_path)
    by_file = resolve_model(str(tmp_path / "config.json"))
    assert dataclasses.replace(by_file.info, name=by_dir.info.name) == by_dir.info
    assert by_dir.info.num_layers == 3 and by_dir.info.sliding_window == 12
    assert "config.json" in by_dir.source and "config file" in by_file.source


@pytest.mark.parametrize("model_type,words", [("mamba", "SSM"), ("deepseek_v3", "MLA")])
def test_unsupported_families_get_a_clear_message(tmp_path, capsys, model_type, words):
    cfg = {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 128, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "--budget", "8GB", "--model", str(tmp_path), "--context", "1k")
    assert code == 2 and words in err and "not supported" in err


# ---------------------------------------------------------------------------------- memory model
def _accounting_kv(info, batch, seen, key_dim, budget, elem, scores, exact, prompt, chunk):
    """KV bytes at the end of decoding, written straight from kvpress_aqua.core.accounting."""
    total = 0
    compressed = budget is not None or key_dim < info.head_dim
    for i in range(info.num_layers):
        window = info.sliding_window if info.is_sliding(i) else None
        slots = (decode_slots(budget, seen, window, prompt=prompt, chunk=chunk) if compressed
                 else dense_layer_tokens(seen, window))
        total += layer_nbytes(batch, info.num_kv_heads, slots, key_dim, info.head_dim, elem, compressed=compressed,
                              needs_scores=scores and budget is not None, exact_tokens=exact,
                              residual_dim=info.head_dim - key_dim)
    return total


@pytest.mark.parametrize("name", ["llama-3.1-8b", "gemma-3-12b", "gemma-2-9b", "phi-3-mini-4k", "smollm2-135m"])
@pytest.mark.parametrize("key_dim_frac,budget", [(1, None), (1, 1000), (0.5, 1000), (0.5, None), (0.75, 50_000)])
@pytest.mark.parametrize("exact", [0, 68])
def test_kv_prediction_is_the_accounting_formula(name, key_dim_frac, budget, exact):
    shape = resolve_model(name)
    mm = MemoryModel(shape, batch=3, context=20_000, new_tokens=65, dtype="bf16", prefill_chunk=1024,
                     overhead=0, token_policy="h2o", exact_tokens=exact)
    key_dim = int(shape.info.head_dim * key_dim_frac)
    got = mm.evaluate(key_dim, budget)
    assert got.kv == _accounting_kv(shape.info, 3, 20_000 + 64, key_dim, budget, 2, scores=True, exact=exact,
                                    prompt=20_000, chunk=1024)
    columns = shape.info.head_dim if exact else key_dim
    expected_proj = shape.info.num_layers * shape.info.num_kv_heads * shape.info.head_dim * columns * 2
    assert got.projections == (expected_proj if key_dim < shape.info.head_dim else 0)


def test_sliding_window_layers_are_charged_only_the_window():
    shape = resolve_model("gemma-3-12b")
    info = shape.info

    def dense_kv(context):
        return MemoryModel(shape, 1, context, 2, "bf16", 1024, 0).evaluate(info.head_dim, None).kv

    per_token_full = 8 * info.num_kv_heads * 2 * info.head_dim * 2  # 8 full layers, K+V, bf16
    assert dense_kv(64_000) - dense_kv(32_000) == 32_000 * per_token_full
    window_part = 40 * info.num_kv_heads * (info.sliding_window - 1) * 2 * info.head_dim * 2
    assert dense_kv(32_000) == window_part + 8 * info.num_kv_heads * 32_001 * 2 * info.head_dim * 2


def test_gqa_and_mqa_scale_kv_by_kv_heads_and_scores_by_query_heads():
    shapes = {kv: resolve_model(AutoConfig.for_model("llama", **{**TINY, "num_key_value_heads": kv}))
              for kv in (4, 2, 1)}
    dense = {kv: MemoryModel(s, 2, 300, 10, "fp16", 64, 0).evaluate(32, None) for kv, s in shapes.items()}
    assert dense[4].kv == 2 * dense[2].kv == 4 * dense[1].kv
    evicting = {kv: MemoryModel(s, 2, 300, 10, "fp16", 64, 0).evaluate(32, 100) for kv, s in shapes.items()}
    assert evicting[4].attention == evicting[2].attention == evicting[1].attention > 0
    assert evicting[4].kv > evicting[2].kv > evicting[1].kv
    assert shapes[1].info.group_size == 4


def test_prefill_holds_budget_plus_chunk_in_one_layer_at_a_time():
    """The cache evicts each layer's overfilled chunk when the next layer updates: one layer holds the chunk."""
    shape = resolve_model("smollm2-135m")
    one = MemoryModel(shape, 1, 4096, 0, "fp32", None, 0).evaluate(64, 256)
    chunked = MemoryModel(shape, 1, 4096, 0, "fp32", 512, 0).evaluate(64, 256)
    slot = layer_nbytes(1, 1, 1, 64, 64, 4, compressed=True, needs_scores=True) - 4  # one slot of one KV head
    budget_layer = 3 * 256 * slot + 4
    assert one.peak_kv == 29 * budget_layer + (3 * 4096 * slot + 4)
    assert chunked.peak_kv == 29 * budget_layer + (3 * (256 + 512) * slot + 4)
    assert chunked.copy == budget_layer  # the current layer's old tensors, alive until its cat is done
    assert chunked.total < one.total


def test_dense_cache_charges_sdpa_mask_and_kv_expansion_only_for_masked_chunks():
    shape = resolve_model("llama-3.2-1b")  # 32 query heads, 8 KV heads, head_dim 64, hidden 2048, MLP 8192
    logits = 2 * 128_256 * (2 + 4)
    chunked = MemoryModel(shape, 2, 32768, 0, "bf16", 1024, 0).evaluate(64, None)
    mask, repeat_kv = 2 * 1024 * 32768, 2 * 2 * 32 * 32768 * 64 * 2  # the last chunk sees all 32768 keys
    assert chunked.attention == mask + repeat_kv
    assert chunked.activations == 2 * 1024 * (4 * 2048 + 2 * 32 * 64 + 2 * 8 * 64) * 2 + logits  # attention step
    one = MemoryModel(shape, 2, 32768, 0, "bf16", None, 0).evaluate(64, None)  # is_causal: no mask, no expansion
    assert one.attention == 0 and one.activations == 2 * 32768 * (4 * 2048 + 3 * 8192) * 2 + logits  # MLP step
    mha = resolve_model("smollm2-1.7b")  # 32 heads, 32 KV heads: a mask, nothing to expand
    assert MemoryModel(mha, 2, 65536, 0, "bf16", 1024, 0).evaluate(64, None).attention == 2 * 1024 * 65536


def test_working_set_is_the_larger_of_the_attention_and_mlp_steps():
    shape = resolve_model("smollm2-135m")  # hidden 576, MLP 1536, 9 heads, 3 KV heads, head_dim 64
    small = MemoryModel(shape, 1, 4096, 0, "fp32", 16, 0).evaluate(64, 16)  # few scores: the MLP step is larger
    assert small.attention == 0 and small.activations == 16 * (4 * 576 + 3 * 1536) * 4 + 49152 * 8
    big = MemoryModel(shape, 1, 4096, 0, "fp32", 512, 0).evaluate(64, 1024)
    copies = 3 * 512 * 9 * 64 * 4  # regrouped queries, output, its transposed copy
    blocks = 2 * min(8 * 2**20, 9 * 512 * (1024 + 512 + 512) * 4)  # two score blocks of the reference, capped
    assert big.attention == copies + blocks
    assert big.activations == 512 * (4 * 576 + 2 * 9 * 64 + 2 * 3 * 64) * 4 + 49152 * 8


def test_candidate_key_dims_are_kernel_friendly():
    assert candidate_key_dims(64) == [64, 56, 48, 40, 32, 24, 16]
    assert candidate_key_dims(128) == [128, 112, 96, 80, 64, 48, 32]
    assert candidate_key_dims(96) == [96, 88, 80, 72, 64, 56, 48, 40, 32, 24]


# --------------------------------------------------------------------------------------- planning
def test_plan_picks_the_largest_budget_that_fits_and_reports_the_source(no_artifacts):
    p = plan(None, "smollm2-135m", context="8k", new_tokens=64, dtype="fp32", prefill_chunk=256,
             device_memory="1300MiB")
    assert p.fits and p.recommendation.verdict == "recommended" and p.budget is None
    assert "default heuristic" in p.quality_source and p.quality_model.kind == "default"
    mm, device = p.memory_model, p.limits.device
    assert device == 1300 * 2**20 and "device memory binds" in p.binding
    for c in p.candidates:
        assert c.memory.total <= device and c.prefill_chunk == 256
        if c.token_budget is not None:
            assert mm.evaluate(c.key_dim, c.token_budget + 1).total > device
    assert p.recommendation.quality == max(c.quality for c in p.candidates)
    cache = [c.memory.cache_peak for c in p.frontier]
    qualities = [c.quality for c in p.frontier]
    assert cache == sorted(cache) and qualities == sorted(qualities)


def test_quality_from_a_synthetic_spectrum_and_a_sweep():
    # energy concentrated in the first quarter of 64 channels: pruning to 16 loses little
    spectrum = torch.cat([torch.full((2, 3, 16), 10.0), torch.full((2, 3, 48), 0.1)], dim=-1)
    model = QualityModel.from_spectrum(spectrum, "synthetic")
    assert model.channel_energy(0.25) == pytest.approx(1600 / (1600 + 0.48), rel=1e-6)
    assert model(0.25, 1.0) > 0.99 and "synthetic" in model.source and "spectrum" in model.source
    default = QualityModel.default()
    assert default(0.25, 1.0) < 0.05 and default(1.0, 1.0) == 1.0
    assert default(1.0, 0.5, "h2o") > default(1.0, 0.5, "sliding")
    sweep = QualityModel.from_sweep([{"k_ratio": 0.5, "retained": 0.1, "quality": 0.4},
                                     {"k_ratio": 0.5, "retained": 0.5, "quality": 0.8},
                                     {"k_ratio": 1.0, "retained": 0.1, "quality": 0.6},
                                     {"k_ratio": 1.0, "retained": 0.5, "quality": 1.0}], "run 7")
    assert sweep(0.75, 0.3) == pytest.approx(0.7)
    assert "measured" in sweep.source
    p = plan("1GiB", "smollm2-135m", context=2048, dtype="fp32", quality=model, overhead=0)
    assert p.quality_source == model.source and p.to_dict()["quality_source"] == model.source


def test_artifact_found_for_the_model_is_used(monkeypatch, tmp_path):
    checked = []
    artifact = types.SimpleNamespace(spectrum=torch.linspace(2, 0.1, 64).expand(30, 3, 64), path=tmp_path / "a.pt",
                                     check_model=checked.append)
    monkeypatch.setattr(quality_model, "find_artifact", lambda info, framework: artifact)
    p = plan("2GB", "smollm2-135m", context=1024, dtype="fp32")
    assert p.quality_model.kind == "spectrum" and str(tmp_path / "a.pt") in p.quality_source
    assert f"no calibration sweep at {tmp_path / 'a.sweep.json'}" in p.quality_source
    assert [info.name for info in checked] == ["smollm2-135m"]  # checked against the model, as the runtime does


def _identity_artifact(path, info, model, layers=None):
    """A valid artifact (identity bases) keyed to ``info``'s fingerprint; ``layers`` overrides its layer count."""
    layers = layers or info.num_layers
    h, d = info.num_kv_heads, info.head_dim
    ones = np.ones((layers, h, d), np.float32)
    meta = {"model": model, "fingerprint": info.fingerprint, "num_layers": layers, "num_heads": info.num_heads,
            "num_kv_heads": h, "head_dim": d}
    return AquaArtifact(np.broadcast_to(np.eye(d, dtype=np.float32), (layers, h, d, d)),
                        np.broadcast_to(np.linspace(1, 0.1, d, dtype=np.float32), (layers, h, d)), ones, ones,
                        meta).save(path)


def test_artifact_of_another_model_is_refused(tmp_path, capsys):
    smol = resolve_model("smollm2-135m").info
    path = _identity_artifact(tmp_path / "smol.safetensors", smol, "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert plan("8GB", "smollm2-135m", context="4k", artifact=path).quality_model.kind == "spectrum"
    with pytest.raises(ValueError) as err:
        plan("24GiB", "llama-3.1-8b", context="8k", artifact=path)
    message = str(err.value)
    assert "calibrated for model HuggingFaceTB/SmolLM2-135M-Instruct" in message and "not llama-3.1-8b" in message
    assert str(path) in message and "run `kvtool calibrate llama-3.1-8b`" in message
    code, out, err_text = run_cli(capsys, "--budget", "24GiB", "--model", "llama-3.1-8b", "--artifact", str(path))
    assert code == 2 and out == "" and "not llama-3.1-8b" in " ".join(err_text.split())


def test_artifact_of_the_wrong_shapes_is_refused(tmp_path):
    smol = resolve_model("smollm2-135m").info
    path = _identity_artifact(tmp_path / "cut.safetensors", smol, "smollm2-135m", layers=2)  # same fingerprint
    with pytest.raises(ValueError, match=r"needs \(layers, kv_heads, head_dim, head_dim\) = \(30, 3, 64, 64\)"):
        plan("8GB", "smollm2-135m", context="4k", artifact=path)


def test_does_not_fit_names_need_have_and_the_largest_context_and_batch():
    args = dict(model="llama-3.2-1b", batch=4, new_tokens=16, dtype="bf16", prefill_chunk=512)
    p = plan(None, context="32k", device_memory="3.1GB", **args)
    assert not p.fits and p.recommendation is None
    assert p.message.startswith("does not fit: needs ") and "you have 2.89 GiB (3,100,000,000 B)" in p.message
    assert "of device memory" in p.message
    context = int(p.message.split("largest context that fits at batch 4 is ")[1].split(" tokens")[0].replace(",", ""))
    batch = int(p.message.split("largest batch that fits at 32,768 tokens is ")[1].split(";")[0])
    assert 0 < context < 32768 and 0 < batch < 4
    fits = functools.partial(plan, None, device_memory="3.1GB")
    assert fits(context=context, **args).fits and not fits(context=context + 1, **args).fits
    assert fits(context="32k", **{**args, "batch": batch}).fits
    assert not fits(context="32k", **{**args, "batch": batch + 1}).fits
    weights_only = plan("8GB", "meta-llama/Llama-3.1-8B-Instruct", context="128k", batch=4, new_tokens=512,
                        device_memory="8GB")
    assert "the weights alone need 14.96 GiB" in weights_only.message
    kv = plan("10MB", "llama-3.2-1b", context="32k", batch=4)  # 64 tokens of 16 layers x 4 x 8 heads need more
    assert not kv.fits and "of KV cache even at" in kv.message and "you have 9.54 MiB (10,000,000 B)" in kv.message


def test_a_fixed_chunk_that_does_not_fit_gets_the_chunk_with_the_best_quality():
    args = dict(model="llama-3.2-1b", context="32k", dtype="bf16", device_memory="4GB")
    p = plan(None, prefill_chunk="16k", **args)
    assert not p.fits and "--prefill-chunk" in p.message
    chunk = int(p.message.split("--prefill-chunk ")[1].split(" ")[0])
    searched = plan(None, **args)  # the planner picks that chunk itself
    assert searched.fits and searched.recommendation.prefill_chunk == chunk
    assert f"estimated quality {searched.recommendation.quality:.3f}" in p.message
    others = [plan(None, prefill_chunk=c, **args).recommendation for c in CHUNK_CHOICES]
    assert max(round(o.quality, 3) for o in others if o) == round(searched.recommendation.quality, 3)
    assert "64 TiB" not in p.message and "TiB" not in searched.explain()



def test_preset_toml_round_trips_through_the_policy_parser(tmp_path):
    p = plan(None, "smollm2-135m", context=4096, new_tokens=32, dtype="fp32", overhead=0, device_memory="600MB",
             quality=QualityModel.from_spectrum(torch.linspace(3, 0.01, 64).expand(30, 3, 64), "synthetic"))
    path = tmp_path / "plan.toml"
    path.write_text(p.to_toml())
    spec = parse_policy(str(path))
    assert spec.entries == p.recommendation.entries
    assert spec.prefill_chunk == p.recommendation.prefill_chunk in CHUNK_CHOICES  # the chunk the plan depends on
    token = next(e for e in spec.entries if e["type"] == "h2o")
    assert token["heavy"] + token["recent"] + token["sinks"] == p.recommendation.token_budget
    assert "kvtool plan" in spec.description


@pytest.mark.parametrize("name", [*plannable_token_policies(), "streaming"])
def test_every_registered_token_policy_is_planned(no_artifacts, tmp_path, name):
    row = policy_type(name)
    p = plan(None, "smollm2-135m", context=4096, new_tokens=32, dtype="fp32", prefill_chunk=256, overhead=0,
             token_policy=name, device_memory="600MB")
    mm, best = p.memory_model, p.recommendation
    assert p.fits and mm.token_policy == row.name == p.to_dict()["token_policy"]
    assert mm.needs_scores == row.needs_scores
    (token, *_) = best.entries
    assert token == token_entry(row.name, best.token_budget)
    # a score per slot is charged exactly when the registry says the policy reads scores
    unscored = dataclasses.replace(mm, token_policy="sliding").evaluate(best.key_dim, best.token_budget)
    scored = dataclasses.replace(mm, token_policy="h2o").evaluate(best.key_dim, best.token_budget)
    assert best.memory.kv == (scored.kv if row.needs_scores else unscored.kv) and scored.kv > unscored.kv
    assert best.quality == p.quality_model(best.k_ratio, best.retained, "h2o" if row.needs_scores else "sliding")
    path = tmp_path / "plan.toml"
    path.write_text(p.to_toml())
    assert parse_policy(str(path)).build()[0] == row.load()(**{k: v for k, v in token.items() if k != "type"})


def test_tova_is_scored_like_h2o_by_the_heuristic():
    default = QualityModel.default()
    assert default(0.5, 0.25, "tova") == default(0.5, 0.25, "h2o") > default(0.5, 0.25, "sliding")
    assert quality_model.retention_exponent("streaming") == quality_model.RETENTION_EXPONENT["position"]
    with pytest.raises(ValueError, match=f"unknown token policy 'aqua'; use one of {', '.join(policy_names('token'))}"):
        plan("8GB", "smollm2-135m", context=1024, token_policy="aqua")


def test_the_plannable_policies_are_the_registrys_token_rows_with_a_budget():
    rows = POLICY_TYPES.values()
    assert plannable_token_policies() == tuple(sorted(r.name for r in rows if r.kind == "token" and r.split))
    assert {"h2o", "tova", "sliding"} <= set(plannable_token_policies())
    rate = dataclasses.replace(policy_type("h2o"), name="rate-only", split=())  # a policy keeping a rate, no budget
    with mock.patch.dict(POLICY_TYPES, {"rate-only": rate}), mock.patch.dict(registry._BY_NAME, {"rate-only": rate}):
        assert "rate-only" not in plannable_token_policies()
        with pytest.raises(ValueError, match="keeps a rate, not a token budget"):
            plan("8GB", "smollm2-135m", context=1024, token_policy="rate-only")


def test_bad_python_arguments_raise_value_error():
    for kwargs in ({"batch": 0}, {"new_tokens": -1}, {"context": 0}, {"prefill_chunk": 0}, {"dtype": "fp7"},
                   {"token_policy": "lru"}, {"budget": "-8GB"}, {"overhead": "-1GB"}):
        with pytest.raises(ValueError):
            plan(**{"budget": "8GB", "model": "smollm2-135m", "context": 1024, **kwargs})


# ---------------------------------------------------------------------------------- command line
@pytest.mark.parametrize("argv,words", [
    (["--budget", "-1GB"], "'8GB'"),
    (["--budget", "0"], "positive"),
    (["--budget", "8G"], "ambiguous"),
    (["--dtype", "fp7"], "bf16"),
    (["--context", "0"], "at least 1"),
    (["--context", "12x"], "128k"),
    (["--batch", "0"], "--batch 1"),
    (["--prefill-chunk", "0"], "at least 1"),
    (["--model", "no-such-model"], "offline table"),
    (["--model", "./missing/dir"], "does not exist"),
])
def test_cli_bad_input_exits_2_with_the_fix(capsys, argv, words):
    base = {"--budget": "8GB", "--model": "smollm2-135m", "--context": "1k"}
    base.update(dict(zip(argv[::2], argv[1::2], strict=True)))
    code, out, err = run_cli(capsys, *[f"{k}={v}" for k, v in base.items()])
    assert code == 2 and out == ""
    assert "error:" in err and words in " ".join(err.split())


def test_cli_unknown_hub_id_offline_is_a_one_line_error(capsys, monkeypatch):
    def offline(name):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(model_shape, "_hub_config", offline)
    code, _, err = run_cli(capsys, "--budget", "8GB", "--model", "someone/unknown-model", "--context", "1k")
    assert code == 2 and "couldn't connect" in err and "Check your connection" not in err


def test_cli_table_echoes_the_budget_and_explains(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "--budget", "2GB", "--model", "smollm2-135m", "--context", "4k", "--new-tokens",
                           "64", "--dtype", "fp32", "--prefill-chunk", "512", "--explain", "--emit-preset",
                           str(tmp_path / "p.toml"), "--plot", str(tmp_path / "p.png"))
    text = " ".join(out.split())
    assert code == 0
    assert "budget 2GB = 2,000,000,000 bytes" in text and "quality source (" in text
    assert "recommended" in text and "fits:" in text
    assert "= 134,515,008·4" in text and "ATTENTION_COPIES=3" in text
    assert parse_policy(str(tmp_path / "p.toml")).description.startswith("kvtool plan")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_json(capsys, no_artifacts):
    code, out, _ = run_cli(capsys, "--budget", "4GiB", "--device-memory", "24GiB", "--model", "qwen3-8b", "--context",
                           "32k", "--batch", "2", "--new-tokens", "256", "--prefill-chunk", "1k", "--json")
    data = json.loads(out)
    assert code == 0 and data["budget_bytes"] == 4 * 2**30 and data["device_memory_bytes"] == 24 * 2**30
    assert data["recommendation"]["cache_peak_bytes"] <= 4 * 2**30 and data["binding"]
    assert data["context"] == 32768 and data["recommendation"]["prefill_chunk"] == 1024
    assert data["reproduce"].startswith("kvtool needle --model qwen3-8b --policy plan.toml")

    assert data["model"]["kv_heads"] == 8 and data["dtype"] == "bf16"
    assert data["recommendation"]["verdict"] == "recommended" and data["recommendation"]["total_bytes"] <= 24 * 2**30
    assert len(data["candidates"]) == len(candidate_key_dims(128)) and data["frontier"]
    assert data["quality_source"].startswith("default heuristic")


def test_cli_nothing_fits_exits_1(capsys):
    code, out, _ = run_cli(capsys, "--budget", "8GB", "--device-memory", "8GB", "--model",
                           "meta-llama/Llama-3.1-8B-Instruct", "--context", "128k", "--batch", "4", "--json")
    data = json.loads(out)
    assert code == 1 and not data["fits"] and data["recommendation"] is None and data["reproduce"] is None
    assert "does not fit" in data["message"] and "the weights alone need" in data["message"]



# ----------------------------------------------------------------- measured against the real cache
def _run_cache(model, candidate, batch, context, new_tokens, chunk):
    from kvpress_aqua import CompressedCache

    # Aqua's identity basis stores exactly the bytes of the SVD basis and needs no calibration artifact.
    entries = tuple({**e, "basis": "identity"} if e["type"] == "aqua" else e for e in candidate.entries)
    cache = CompressedCache(model, *PolicySpec("plan", entries).build(), prefill_chunk=chunk)
    ids = torch.randint(2, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = cache.prefill(ids)
        for _ in range(new_tokens - 1):
            logits = model(logits.argmax(-1, keepdim=True), **cache_kwargs(model, cache)).logits[:, -1]
    measured = cache.nbytes()
    cache.detach()
    return measured


def _check_plan_against_cache(model, p, chunk):
    mm = p.memory_model
    aqua = sorted((c for c in p.candidates if c.fits and c.k_ratio < 1), key=lambda c: c.token_budget is None)
    chosen = [p.recommendation, *aqua[:1]]  # an evicting AQUA point first, if one fits
    for c in chosen:
        measured = _run_cache(model, c, mm.batch, mm.context, mm.new_tokens, chunk)
        assert abs(measured - c.memory.cache_bytes) <= 0.01 * c.memory.cache_bytes, (c.k_ratio, c.token_budget)
    return chosen


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "gemma3_text", "phi3", "llama-mqa"])
@pytest.mark.parametrize("batch,context,new_tokens,chunk", [(2, 60, 6, 16), (1, 45, 1, None)])
def test_recommended_cache_bytes_match_the_prediction(arch, batch, context, new_tokens, chunk):
    model = tiny_model(arch)
    shape = resolve_model(model.config)
    room = MemoryModel(shape, batch, context, new_tokens, "fp32", chunk, 0).evaluate(16, 30).total
    p = plan(None, model.config, context=context, batch=batch, new_tokens=new_tokens, dtype="fp32",
             prefill_chunk=chunk, overhead=0, min_tokens=8, device_memory=room)
    assert p.fits
    checked = _check_plan_against_cache(model, p, chunk)
    if chunk:  # with chunked prefill a token budget saves memory, so the k_ratio 0.5 point evicts
        assert any(c.token_budget is not None and c.k_ratio < 1 for c in checked)


def test_smollm2_shaped_cache_bytes_match_the_prediction():
    from transformers import AutoModelForCausalLM

    shape = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shape.config, dtype=torch.float32).eval()  # weights do not change bytes
    assert sum(p.numel() for p in model.parameters()) == shape.parameters
    p = plan(None, model.config, context=600, new_tokens=8, dtype="fp32", prefill_chunk=128, overhead=0,
             device_memory="560MB")
    assert p.fits and p.recommendation.token_budget is not None
    _check_plan_against_cache(model, p, 128)


@pytest.mark.slow
def test_real_smollm2_cache_bytes_match_the_prediction(smollm2):
    model, _ = smollm2
    shape = resolve_model(model.config)
    assert shape.parameters == sum(x.numel() for x in model.parameters())
    room = MemoryModel(shape, 2, 700, 6, "fp32", 256, 0).evaluate(shape.info.head_dim, 300).total
    p = plan(None, model.config, context=700, batch=2, new_tokens=6, dtype="fp32", prefill_chunk=256, overhead=0,
             device_memory=room)
    assert p.fits
    _check_plan_against_cache(model, p, 256)


# --------------------------------------------------------- the design card: KV budget, device, chunk
CARD = ("--budget", "8GB", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--context", "128k", "--batch", "4")


def test_the_design_cards_example_plans_a_kv_cache_of_8gb(capsys, no_artifacts):
    code, out, _ = run_cli(capsys, *CARD, "--json")
    data = json.loads(out)
    best = data["recommendation"]
    assert code == 0 and data["fits"] and data["budget_bytes"] == 8 * 10**9 and data["device_memory_bytes"] is None
    assert best["cache_peak_bytes"] <= 8 * 10**9 < best["total_bytes"]  # the budget is the cache's, not the run's
    assert best["token_budget"] and 0 < best["quality"] < 1 and best["prefill_chunk"] in CHUNK_CHOICES
    assert "KV budget binds" in data["binding"] and data["quality_metric"] == "heuristic"
    p = plan("8GB", "meta-llama/Llama-3.1-8B-Instruct", context="128k", batch=4)
    mm = dataclasses.replace(p.memory_model, prefill_chunk=best["prefill_chunk"])
    assert mm.evaluate(best["key_dim"], best["token_budget"] + 1).cache_peak > 8 * 10**9  # the largest that fits
    fixed = [plan("8GB", "llama-3.1-8b", context="128k", batch=4, prefill_chunk=k).candidates for k in (256, 8192)]
    for c in p.candidates:  # each width's chunk is the best of the searched ones, to the printed decimals
        assert all(round(o.quality, 3) <= round(c.quality, 3) for row in fixed for o in row if o.key_dim == c.key_dim)



def test_device_memory_checks_the_whole_run_and_names_what_binds(no_artifacts):
    args = dict(model="llama-3.1-8b", context="128k", batch=4)
    on_h100 = plan("8GB", device_memory="h100", **args)
    assert on_h100.limits.device == 81_559 * 2**20 and on_h100.device_label == "h100 (81,559 MiB)"
    assert on_h100.fits and on_h100.recommendation.memory.total <= on_h100.limits.device
    tight = plan("8GB", device_memory="20GB", **args)
    assert tight.fits and "device memory binds" in tight.binding and "weights 14.96 GiB" in tight.binding
    assert tight.recommendation.token_budget < on_h100.recommendation.token_budget
    assert tight.recommendation.memory.total <= 20 * 10**9
    only_device = plan(None, device_memory="A100-40GB", **args)
    assert only_device.budget is None and only_device.limits.device == 40 * 2**30 and only_device.fits
    with pytest.raises(ValueError, match="or a GPU name: h100, h200"):
        plan("8GB", device_memory="tpu-v9", **args)
    with pytest.raises(ValueError, match="--budget .* or the device memory"):
        plan(None, **args)


def test_the_preset_carries_the_chunk_and_the_reproduce_command_names_it(capsys, tmp_path, no_artifacts):
    path = tmp_path / "plan.toml"
    code, out, _ = run_cli(capsys, *CARD, "--emit-preset", str(path))
    spec = parse_policy(str(path))
    assert code == 0 and spec.prefill_chunk in CHUNK_CHOICES
    assert f"prefill chunk {spec.prefill_chunk:,}" in spec.description
    text = " ".join(out.split())
    assert f"kvtool needle --model meta-llama/Llama-3.1-8B-Instruct --policy {path} --policy full --lengths 128k" in (
        text)



@pytest.mark.parametrize("columns", [80, 120])
def test_tables_keep_every_number_whole_at_80_and_120_columns(capsys, monkeypatch, no_artifacts, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    code, out, _ = run_cli(capsys, *CARD, "--device-memory", "h100")
    assert code == 0
    p = plan("8GB", "llama-3.1-8b", context="128k", batch=4, device_memory="h100")
    lines = out.splitlines()
    for c in (*p.candidates, *p.frontier[-1:]):
        row = [f"{c.k_ratio:g}", str(c.key_dim), f"{c.token_budget:,}", f"{c.prefill_chunk:,}",
               format_bytes(c.memory.cache_peak), format_bytes(c.memory.total), f"{c.quality:.3f}"]
        assert any(line.split()[:len(row) + 2] == [*row[:4], *" ".join(row[4:]).split()] for line in lines), row
    assert "recommended" in out and max(len(line) for line in lines if "│" not in line) <= columns

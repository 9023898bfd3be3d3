"""kvtool plan, the model side: size parsing, model resolution, and the memory model against
kvpress_aqua.core.accounting and the measured cache.

The search (quality sources, "does not fit", presets, policies) is in test_planner_search.py, the command
line in test_planner_cli.py; the tiny models and ``run_cli`` they share are in planner_helpers.py.
"""

import dataclasses
import json

import pytest
import torch
from planner_helpers import TINY, TINY_ARCHS, run_cli, run_planned_cache, tiny_arch_config, tiny_arch_model
from transformers import AutoConfig, AutoModelForCausalLM

from kvpress_aqua.core.accounting import decode_slots, dense_layer_tokens, layer_nbytes
from kvpress_aqua.planner.search import (
    MemoryModel,
    candidate_key_dims,
    count_parameters,
    offline_models,
    plan,
    resolve_model,
)
from kvpress_aqua.util.sizes import format_bytes, parse_size, parse_tokens


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
    model = tiny_arch_model(arch)
    assert count_parameters(model.config)[0] == sum(p.numel() for p in model.parameters())


def test_local_folder_and_config_file(tmp_path):
    data = tiny_arch_config("gemma2").to_dict()
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


# ----------------------------------------------------------------- measured against the real cache
def _check_plan_against_cache(model, p):
    mm = p.memory_model
    aqua = sorted((c for c in p.candidates if c.fits and c.k_ratio < 1), key=lambda c: c.token_budget is None)
    chosen = [p.recommendation, *aqua[:1]]  # an evicting AQUA point first, if one fits
    for c in chosen:
        measured, _ = run_planned_cache(model, c, mm.batch, mm.context, mm.new_tokens)
        assert abs(measured - c.memory.cache_bytes) <= 0.01 * c.memory.cache_bytes, (c.k_ratio, c.token_budget)
    return chosen


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "gemma3_text", "phi3", "llama-mqa"])
@pytest.mark.parametrize("batch,context,new_tokens,chunk", [(2, 60, 6, 16), (1, 45, 1, None)])
def test_recommended_cache_bytes_match_the_prediction(arch, batch, context, new_tokens, chunk):
    model = tiny_arch_model(arch)
    shape = resolve_model(model.config)
    room = MemoryModel(shape, batch, context, new_tokens, "fp32", chunk, 0).evaluate(16, 30).total
    p = plan(None, model.config, context=context, batch=batch, new_tokens=new_tokens, dtype="fp32",
             prefill_chunk=chunk, overhead=0, min_tokens=8, device_memory=room)
    assert p.fits
    checked = _check_plan_against_cache(model, p)
    if chunk:  # with chunked prefill a token budget saves memory, so the k_ratio 0.5 point evicts
        assert any(c.token_budget is not None and c.k_ratio < 1 for c in checked)


def test_smollm2_shaped_cache_bytes_match_the_prediction():
    shape = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shape.config, dtype=torch.float32).eval()  # weights do not change bytes
    assert sum(p.numel() for p in model.parameters()) == shape.parameters
    p = plan(None, model.config, context=600, new_tokens=8, dtype="fp32", prefill_chunk=128, overhead=0,
             device_memory="560MB")
    assert p.fits and p.recommendation.token_budget is not None
    _check_plan_against_cache(model, p)


@pytest.mark.slow
def test_real_smollm2_cache_bytes_match_the_prediction(smollm2):
    model, _ = smollm2
    shape = resolve_model(model.config)
    assert shape.parameters == sum(x.numel() for x in model.parameters())
    room = MemoryModel(shape, 2, 700, 6, "fp32", 256, 0).evaluate(shape.info.head_dim, 300).total
    p = plan(None, model.config, context=700, batch=2, new_tokens=6, dtype="fp32", prefill_chunk=256, overhead=0,
             device_memory=room)
    assert p.fits
    _check_plan_against_cache(model, p)

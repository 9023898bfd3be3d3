"""``kvtool plan --gpus N --parallel tp|pipeline``: per-GPU bytes, the split rules, the refusal and the output."""

import json
import math
import re
from dataclasses import replace

import pytest
import torch
from planner_helpers import TINY_ARCHS, run_cli, tiny_arch_config
from transformers import AutoConfig, AutoModelForCausalLM

try:  # transformers 5: the balanced device_map and tp plans the planner reproduces
    from transformers.integrations.accelerate import _get_device_map
except ImportError:  # transformers 4.57 places modules and plans lm_head otherwise (see docs/planner.md)
    _get_device_map = None

from kvpress_aqua.cli import main
from kvpress_aqua.core.accounting import START_BYTES
from kvpress_aqua.planner.model_shape import parameter_parts, resolve_model
from kvpress_aqua.planner.parallel import Parallel
from kvpress_aqua.planner.search import plan

POINTS = [(128, None), (128, 2048), (96, 4096), (64, 1000)]  # (key_dim, token budget): dense, H2O, H2O + AQUA


def _single(model="llama-3.1-8b", **kwargs):
    """The one-GPU run of ``model`` at 16k, batch 4, 64 new tokens, bf16, chunk 2,048."""
    return plan("8GB", model, context="16k", batch=4, new_tokens=64, dtype="bf16", prefill_chunk=2048,
                **kwargs).memory_model


@pytest.mark.parametrize("key_dim,knob", POINTS)
def test_tensor_parallel_ranks_hold_a_quarter_of_the_kv_heads(key_dim, knob):
    mm = _single()
    one = mm.evaluate(key_dim, knob)
    split = replace(mm, parallel=Parallel("tp", 4)).evaluate(key_dim, knob)
    info = mm.shape.info
    assert len(split.devices) == 4 and len(set(split.devices)) == 1  # the ranks are alike
    rank = split.devices[0]
    # KV and projections split by head exactly; the per-sequence start counter is kept whole on every rank
    compressed = knob is not None or key_dim < info.head_dim
    replicated = 3 * info.num_layers * mm.batch * START_BYTES if compressed else 0
    assert split.kv == one.kv + replicated and 4 * rank.kv == split.kv
    assert split.max_kv == one.max_kv + replicated
    assert split.projections == one.projections and split.host == one.host
    # weights: q/k/v/o and the MLP split, the embeddings, norms and an untied head's rows as transformers shards them
    parts = parameter_parts(mm.shape.source_config)
    whole = parts.embeddings + parts.final_norm + parts.layers * parts.layer_replicated
    assert split.weights - one.weights == 3 * whole * mm.elem
    assert rank.weights == (whole + (one.weights // mm.elem - whole) // 4) * mm.elem
    assert split.device_cache_peak == rank.cache_peak < one.cache_peak


@pytest.mark.parametrize("key_dim,knob", POINTS)
def test_pipeline_devices_sum_to_the_one_gpu_run(key_dim, knob):
    mm = _single()
    one = mm.evaluate(key_dim, knob)
    split = replace(mm, parallel=Parallel("pipeline", 3)).evaluate(key_dim, knob)
    assert split.kv == one.kv and split.weights == one.weights and split.projections == one.projections
    assert sum(d.kv for d in split.devices) == one.kv
    assert max(d.max_kv for d in split.devices) < one.max_kv
    shares = Parallel("pipeline", 3).shares(mm.shape)
    assert [layer for s in shares for layer in s.layers] == list(range(32))  # contiguous, in order, every layer once
    # only the GPU with lm_head holds the logits; the others' activations are smaller by them
    assert [s.logits for s in shares] == [False, False, True]


@pytest.mark.parametrize("tied,layers,gpus,vocab", [(False, 12, 2, 128), (True, 12, 3, 128), (True, 30, 2, 49152),
                                                    (False, 16, 4, 5000), (False, 3, 3, 50000)])
@pytest.mark.skipif(_get_device_map is None, reason="the planner reproduces transformers 5's device_map='auto'; "
                    "4.57's differs (docs/planner.md)")
def test_pipeline_split_is_the_one_of_device_map_auto(tied, layers, gpus, vocab):
    config = AutoConfig.for_model("llama", num_hidden_layers=layers, hidden_size=64, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, vocab_size=vocab, intermediate_size=128,
                                  tie_word_embeddings=tied)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    device_map = _get_device_map(model, "auto", {i: 10**12 for i in range(gpus)}, None)

    def device(name):
        while name not in device_map:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return device_map[name]

    shares = Parallel("pipeline", gpus).shares(resolve_model(config))
    assert [s.layers for s in shares] == [tuple(i for i in range(layers) if device(f"model.layers.{i}.mlp") == g)
                                          for g in range(gpus)]
    assert [s.parameters for s in shares] == [sum(p.numel() for n, p in model.named_parameters() if device(n) == g)
                                              for g in range(gpus)]
    assert [s.logits for s in shares] == [device("lm_head.weight") == g for g in range(gpus)]


_PLAN = re.compile(r"layers\.\*\.(.+)")


@pytest.mark.skipif(_get_device_map is None, reason="the planner models transformers 5's tp plans; 4.57 leaves "
                    "lm_head out of the model's plan (docs/planner.md)")
@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_tensor_parallel_weights_follow_transformers_tp_plan(arch):
    """Rank 0's parameters, by the model's own ``tp_plan`` (colwise: rows split, rowwise: columns split)."""
    config = tiny_arch_config(arch)
    if config.num_key_value_heads % 2:
        pytest.skip("one KV head does not split over two ranks")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    rules = {**{f"model.layers.*.{_PLAN.match(k).group(1)}": v for k, v in config.base_model_tp_plan.items()},
             **model._tp_plan}
    expected = 0
    for name, p in model.named_parameters():
        style = next((v for k, v in rules.items() if re.fullmatch(k.replace(".", r"\.").replace("*", r"\d+"),
                                                                     name.rsplit(".", 1)[0])), None)
        if style is not None and style.startswith("colwise"):
            expected += math.ceil(p.shape[0] / 2) * p[0].numel()
        elif style is not None and style.startswith("rowwise") and p.dim() == 2:
            expected += p.shape[0] * math.ceil(p.shape[1] / 2)
        else:  # not in the plan, norms, a row-split projection's bias: whole on every rank
            expected += p.numel()
    shares = Parallel("tp", 2).shares(resolve_model(config))
    assert [s.parameters for s in shares] == [expected, expected]
    # Phi-3 gathers its fused q/k/v output on every rank: each rank caches every KV head
    heads = config.num_key_value_heads // (1 if arch == "phi3" else 2)
    assert shares[0].shape.info.num_kv_heads == heads


def test_kv_heads_that_do_not_divide_are_refused_with_the_fix(capsys):
    with pytest.raises(ValueError, match=r"3 KV heads.*--gpus 3 .*--parallel pipeline"):
        plan("1GB", "smollm2-135m", context="8k", gpus=2, parallel="tp")
    code, _, err = run_cli(capsys, "--model", "smollm2-135m", "--budget", "1GB", "--gpus", "4")
    assert code == 2 and "do not split evenly over 4 ranks" in err and "--parallel pipeline" in err
    assert plan("1GB", "smollm2-135m", context="8k", gpus=2, parallel="pipeline").fits
    with pytest.raises(ValueError, match="only 32 layers"):
        plan("1GB", "llama-3.1-8b", context="8k", gpus=33, parallel="pipeline")


def test_the_budget_is_per_gpu():
    one = plan("2GB", "llama-3.1-8b", context="32k", batch=8, dtype="bf16").recommendation
    four = plan("2GB", "llama-3.1-8b", context="32k", batch=8, dtype="bf16", gpus=4).recommendation
    assert four.memory.device_cache_peak <= 2e9 < four.memory.cache_peak
    assert four.token_budget > 3 * one.token_budget


@pytest.mark.parametrize("mode", ["tp", "pipeline"])
def test_json_carries_the_per_gpu_breakdown(capsys, mode):
    code, out, _ = run_cli(capsys, "--model", "llama-3.1-8b", "--context", "32k", "--batch", "8", "--budget",
                           "2GB", "--device-memory", "h100", "--gpus", "2", "--parallel", mode, "--json")
    data = json.loads(out)
    assert code == 0 and data["gpus"] == 2 and data["parallel"] == mode and mode in data["split_rule"]
    assert [len(d["layers"]) for d in data["devices"]] == ([32, 32] if mode == "tp" else [16, 16])
    assert [d["kv_heads"] for d in data["devices"]] == ([4, 4] if mode == "tp" else [8, 8])
    rec = data["recommendation"]
    assert len(rec["devices"]) == 2 and max(d["cache_peak_bytes"] for d in rec["devices"]) <= 2e9
    assert sum(d["total_bytes"] for d in rec["devices"]) == rec["total_bytes"]
    assert all(d["total_bytes"] <= data["device_memory_bytes"] for d in rec["devices"])
    assert all(len(c["devices"]) == 2 for c in data["candidates"])
    code, out, _ = run_cli(capsys, "--model", "llama-3.1-8b", "--budget", "2GB", "--json")
    assert json.loads(out)["gpus"] == 1 and json.loads(out)["recommendation"]["devices"] == []


def test_table_has_a_per_gpu_breakdown_at_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli(capsys, "--model", "llama-3.1-70b", "--context", "32k", "--batch", "4", "--budget",
                           "4GB", "--gpus", "4", "--parallel", "pipeline", "--explain")
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 80
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+[0-3]\s+\d+-\d+\s", line)]
    assert [r[:2] for r in rows] == [["0", "0-18"], ["1", "19-40"], ["2", "41-62"], ["3", "63-79"]]
    assert "KV budget per GPU 4GB" in out and "device_map='auto'" in out and "the most loaded" in out
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "per GPU when --gpus is given" in " ".join(capsys.readouterr().out.split())

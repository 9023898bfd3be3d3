"""kvtool plan for retrieval: the planner's copy of the policy, the device and host bytes of a plan against the cache
it builds (tier offloaded and on the device), the tier's growth, the preset, which tier binds, the quality source and
the errors."""

import dataclasses
import json

import pytest
import torch
from planner_helpers import run_cli, run_planned, tiny_arch_model
from tiny_models import make_tiny_model

from kvpress_aqua.core.tier import RetrievalTier
from kvpress_aqua.planner import retrieval as planned
from kvpress_aqua.planner.points import point, score
from kvpress_aqua.planner.search import MemoryModel, QualityModel, plan, resolve_model
from kvpress_aqua.planner.summaries import SUMMARY_POLICIES
from kvpress_aqua.policies import Retrieval
from kvpress_aqua.policies import retrieval as policy_module
from kvpress_aqua.policies.registry import POLICY_TYPES
from kvpress_aqua.presets.spec import PolicySpec, parse_policy


# ------------------------------------------------------------------------- the planner's copy of the policy
def test_the_planners_knobs_and_entry_are_the_policys():
    row = POLICY_TYPES["retrieval"]
    assert row.load() is Retrieval and row.kind == "token" and not row.split and not row.needs_scores
    assert "retrieval" not in SUMMARY_POLICIES
    assert {knob: getattr(Retrieval(), knob) for knob in planned.RETRIEVAL_KNOBS} == dict(planned.RETRIEVAL_KNOBS)
    assert planned.OFFLOADS == policy_module._OFFLOADS and Retrieval().offload == planned.OFFLOADS[0]
    assert planned.PROXY_DTYPES == policy_module._PROXY_DTYPES and Retrieval().proxy_dtype == planned.PROXY_DTYPES[0]
    assert planned.PROXY_SCALE_BYTES == policy_module.INT8_SCALE_BYTES
    entry = planned.retrieval_entry(300, 8, None, max_sinks=2)
    (policy,) = PolicySpec("p", (entry,)).build()
    assert policy == Retrieval(top_k=300, recent=64, sinks=2, rank=8, proxy="lrqk", offload=None)
    assert planned.proxy_ranks(64) == (4, 8, 16, 32) and planned.proxy_ranks(16) == (4, 8, 16)
    assert planned.proxy_ranks(2) == (2,)


@pytest.mark.parametrize("context,chunk", [(300, 64), (129, 64), (100, 1), (1, None), (257, None), (513, 256)])
def test_the_tier_grows_as_the_cache_grows_it(context, chunk):
    """``tier_growth`` against a ``RetrievalTier`` fed the prompt in its chunks, then 300 decode steps."""
    chunk_size = min(chunk or context, context)
    forwards = [min(chunk_size, context - lo) for lo in range(0, context, chunk_size)] + [1] * 300
    tier = RetrievalTier(top_k=10, offload=False)
    tier.allocate(torch.zeros(1, 1, 1, 1), heads=1, key_dim=1, value_dim=1, rank=1)
    old = 0
    for n in forwards:
        before = tier.capacity
        tier.append(*(torch.zeros(1, 1, n, 1) for _ in range(3)))
        old = before if tier.capacity != before else old
        assert planned.tier_growth(context, chunk, tier.used) == (old, tier.capacity), tier.used


# ----------------------------------------------------------------- measured against the real cache
RUNS = [("llama", 2, 300, 20, 64), ("qwen2", 1, 257, 40, None), ("gemma", 3, 160, 1, 48),
        ("llama-mqa", 2, 333, 30, 100), ("qwen3", 1, 129, 5, 64)]
"""(arch, batch, context, new tokens, prefill chunk): ``llama``, ``qwen2``, ``gemma`` are tiny_models' (2 layers,
head_dim 16), the others planner_helpers' (3 layers, head_dim 32); chunk ``None`` is searched; ``qwen3``'s last
chunk is one token (a decode step of the tier), ``gemma`` decodes nothing."""


def _model(arch):
    return make_tiny_model(arch) if arch in ("llama", "qwen2", "gemma") else tiny_arch_model(arch)


def _assert_measured(model, c, batch, context, new_tokens):
    got = run_planned(model, c, batch, context, new_tokens)
    m = c.memory
    assert got == {"device": m.cache_bytes, "host": m.host, "max_device": m.max_kv, "host_peak": m.host_peak}, c


@pytest.mark.parametrize("arch,batch,context,new_tokens,chunk", RUNS)
def test_planned_device_and_host_bytes_are_the_bytes_the_cache_holds(arch, batch, context, new_tokens, chunk):
    model = _model(arch)
    shape = resolve_model(model.config)
    mm = MemoryModel(shape, batch, context, new_tokens, "fp32", chunk, 0, "retrieval", rank=4)
    budget = dataclasses.replace(mm, prefill_chunk=chunk or 256).evaluate(shape.info.head_dim, 40).cache_peak
    p = plan(budget, model.config, context=context, batch=batch, new_tokens=new_tokens, dtype="fp32",
             prefill_chunk=chunk, overhead=0, token_policy="retrieval")
    best = p.recommendation
    assert p.fits and best.top_k and best.memory.cache_peak <= budget
    run = dataclasses.replace(mm, rank=best.rank)
    aqua = point(run, p.quality_model, shape.info.head_dim // 2, best.top_k, best.prefill_chunk, True, "")
    for c in (best, aqua):
        assert c.entries[0] == planned.retrieval_entry(c.top_k, c.rank, "cpu", mm.max_sinks)
        assert 0 < c.memory.host <= c.memory.host_peak
        _assert_measured(model, c, batch, context, new_tokens)


@pytest.mark.parametrize("arch,batch,context,new_tokens,chunk", RUNS)
def test_the_bytes_of_a_tier_on_the_device_are_the_bytes_the_cache_holds(arch, batch, context, new_tokens, chunk):
    """``offload=None`` never holds less than a plain cache, so no plan recommends it: its points are measured."""
    model = _model(arch)
    shape = resolve_model(model.config)
    d = shape.info.head_dim
    mm = MemoryModel(shape, batch, context, new_tokens, "fp32", chunk or 64, 0, "retrieval", rank=8, offload=None)
    quality = QualityModel.default()
    for key_dim in (d, d // 2):
        c = point(mm, quality, key_dim, 40, chunk or 64, fits=True, verdict="")
        assert c.entries[0]["offload"] is None and c.memory.host == c.memory.host_peak == 0
        assert c.memory.cache_bytes > mm.evaluate(key_dim, None).cache_bytes  # more than every token alone
        _assert_measured(model, c, batch, context, new_tokens)


@pytest.mark.parametrize("arch,offload", [("llama", "cpu"), ("llama-mqa", None), ("qwen3", "cpu")])
def test_int8_proxy_keys_bytes_are_the_bytes_the_cache_holds(arch, offload):
    model, batch, context, new_tokens = _model(arch), 2, 240, 12
    shape = resolve_model(model.config)
    mm = MemoryModel(shape, batch, context, new_tokens, "fp32", 64, 0, "retrieval", rank=16, offload=offload,
                     proxy_dtype="int8")
    for key_dim in (shape.info.head_dim, shape.info.head_dim // 2):
        c = point(mm, QualityModel.default(), key_dim, 30, 64, fits=True, verdict="")
        assert c.entries[0]["proxy_dtype"] == "int8" and "rank-16 int8 proxy" in c.label(mm.seen)
        fp = dataclasses.replace(mm, proxy_dtype="model").evaluate(key_dim, 30)
        assert fp.kv - c.memory.kv == shape.info.num_layers * batch * shape.info.num_kv_heads * 256 * (16 * 4 - 20)
        _assert_measured(model, c, batch, context, new_tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the offloaded tier is pinned host memory there")
def test_on_a_gpu_the_pinned_tier_and_the_device_hold_the_planned_bytes():
    model = make_tiny_model("llama").cuda()
    mm = MemoryModel(resolve_model(model.config), 2, 300, 20, "fp32", 64, 0, "retrieval", rank=4)
    for key_dim in (16, 8):
        c = point(mm, QualityModel.default(), key_dim, 40, 64, fits=True, verdict="")
        _assert_measured(model, c, 2, 300, 20)


@pytest.mark.parametrize("arch", ["gemma2", "mistral"])
def test_on_sliding_window_models_a_plain_cache_holds_less_and_retrieval_bytes_stay_exact(arch):
    """Gemma-2 alternates sliding layers (window 12) with full ones, this Mistral slides on all (window 16)."""
    model, batch, context, new_tokens = tiny_arch_model(arch), 2, 200, 10
    shape = resolve_model(model.config)
    mm = MemoryModel(shape, batch, context, new_tokens, "fp32", 64, 0, "retrieval", rank=4)
    c = point(mm, QualityModel.default(), shape.info.head_dim, 40, 64, fits=True, verdict="")
    assert c.entries[0]["sinks"] == 4 and c.memory.cache_peak > mm.evaluate(shape.info.head_dim, None).cache_peak
    p = plan(c.memory.cache_peak, model.config, context=context, batch=batch, new_tokens=new_tokens, dtype="fp32",
             prefill_chunk=64, overhead=0, token_policy="retrieval")
    assert p.recommendation.knob is None and p.binding_tier == "none"  # every token, in a plain cache
    _assert_measured(model, c, batch, context, new_tokens)


def test_the_tier_on_the_device_holds_the_host_tiers_bytes_there():
    mm = MemoryModel(resolve_model("smollm2-135m"), 2, 4096, 16, "bf16", 512, 0, "retrieval", rank=8)
    host, device = mm.evaluate(48, 300), dataclasses.replace(mm, offload=None).evaluate(48, 300)
    assert device.host == device.host_peak == 0 and host.host > 0
    assert device.kv == host.kv + host.host and device.total > host.total


# ------------------------------------------------------------------------------------- the command
ARGV = ("--budget", "20MB", "--model", "smollm2-135m", "--context", "4k", "--new-tokens", "16", "--dtype", "fp32",
        "--token-policy", "retrieval")


def test_cli_plans_retrieval_and_its_preset_parses_and_builds(capsys, no_artifacts, tmp_path):
    path = tmp_path / "plan.toml"
    code, out, _ = run_cli(capsys, *ARGV, "--host-budget", "1GB", "--emit-preset", str(path), "--json")
    data = json.loads(out)
    best = data["recommendation"]
    assert code == 0 and data["token_policy"] == "retrieval" and data["host_budget_bytes"] == 10**9
    assert data["offload"] == "cpu" and best["token_budget"] is None and best["rank"] in planned.RETRIEVAL_RANKS
    assert best["cache_peak_bytes"] <= 20 * 10**6 < best["host_bytes"] <= best["host_peak_bytes"] <= 10**9
    assert best["policies"] == [planned.retrieval_entry(best["top_k"], best["rank"], "cpu")]
    assert data["binding_tier"] == "device" and "the KV budget binds top_k" in data["binding"]
    assert "retrieval is not measured by any sweep" in data["quality_source"] and data["quality_metric"] == "heuristic"
    spec = parse_policy(str(path))
    assert spec.entries == tuple(best["policies"]) and spec.prefill_chunk == best["prefill_chunk"]
    assert "kv_fraction" not in path.read_text()
    (policy,) = spec.build()
    assert policy == Retrieval(top_k=best["top_k"], rank=best["rank"], offload="cpu")
    code, out, _ = run_cli(capsys, *ARGV, "--proxy-dtype", "int8", "--emit-preset", str(path), "--json")
    int8 = json.loads(out)["recommendation"]
    assert code == 0 and int8["policies"][0]["proxy_dtype"] == "int8" and int8["rank"] > best["rank"]
    assert parse_policy(str(path)).build()[0].proxy_dtype == "int8"


def test_cli_table_has_top_k_rank_and_host_columns_in_80_columns(capsys, monkeypatch, no_artifacts):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli(capsys, *ARGV, "--host-budget", "160MB")
    lines = out.splitlines()
    assert code == 0 and max(map(len, lines)) <= 80
    title = lines.index(next(line for line in lines if "largest top_k that fits, per k_ratio" in line))
    header = ["k_ratio", "top_k", "rank", "chunk", "KV", "max", "host", "total", "quality", "verdict"]
    assert lines[title + 1].split() == header  # every header whole
    p = plan("20MB", "smollm2-135m", context="4k", new_tokens=16, dtype="fp32", token_policy="retrieval",
             host_budget="160MB")
    for c, line in zip(p.candidates, lines[title + 3:], strict=False):
        whole = [f"{c.k_ratio:g}", f"{c.top_k:,}", str(c.rank), f"{c.prefill_chunk or 'all'}"]
        assert line.split()[:4] == whole and line.rstrip().endswith(c.verdict), line
    assert "host budget 160MB = 160,000,000 bytes" in out


def test_which_tier_binds(no_artifacts):
    device = plan("20MB", "smollm2-135m", context="4k", new_tokens=16, dtype="fp32", token_policy="retrieval",
                  host_budget="1GB")
    both = plan("20MB", "smollm2-135m", context="4k", new_tokens=16, dtype="fp32", token_policy="retrieval",
                host_budget="160MB")
    assert device.binding_tier == "device" and device.recommendation.k_ratio == 1
    assert both.binding_tier == "device and host" and both.recommendation.k_ratio < 1
    wider = min((c for c in both.candidates if c.key_dim > both.recommendation.key_dim), key=lambda c: c.key_dim)
    assert not wider.fits and wider.memory.host_peak > 160 * 10**6 >= both.recommendation.memory.host_peak
    assert "the host budget binds the key width" in both.binding and "binds top_k" in both.binding
    assert both.to_dict()["binding_tier"] == "device and host"
    on_device = plan("200MB", "smollm2-135m", context="4k", new_tokens=16, dtype="fp32", token_policy="retrieval",
                     offload="none", host_budget="1MB")
    assert on_device.limits.host is None and on_device.fits and on_device.binding_tier != "host"
    assert any("--host-budget 1MB is not used" in note for note in on_device.notes)


def test_an_infeasible_host_budget_is_one_line_that_names_the_fix(capsys, no_artifacts):
    code, out, _ = run_cli(capsys, *ARGV, "--host-budget", "100MB", "--json")
    message = json.loads(out)["message"]
    assert code == 1 and "\n" not in message
    assert message.startswith("does not fit: the retrieval tier needs 122.53 MiB (128,483,328 B) of host memory even "
                              "at k_ratio 0.25 (16 key channels)")
    assert "raise --host-budget to at least 122.53 MiB" in message and "--offload none" in message
    context = int(message.split("the largest context whose tier fits at batch 1 is ")[1].split()[0].replace(",", ""))
    fits = plan("20MB", "smollm2-135m", context=context, new_tokens=16, dtype="fp32", token_policy="retrieval",
                host_budget="100MB")
    assert fits.fits and not plan("20MB", "smollm2-135m", context=context + 1, new_tokens=16, dtype="fp32",
                                  token_policy="retrieval", host_budget="100MB").fits


@pytest.mark.parametrize("argv,words", [
    (("--token-policy", "h2o", "--host-budget", "1GB"), "--token-policy retrieval"),
    (("--token-policy", "h2o", "--offload", "none"), "--token-policy retrieval"),
    (("--token-policy", "tova", "--proxy-dtype", "int8"), "--token-policy retrieval"),
    (("--token-policy", "retrieval", "--host-budget", "1G"), "ambiguous"),
    (("--token-policy", "retrieval", "--offload", "none", "--emit-preset", "x.toml"), "TOML has no null"),
])
def test_bad_retrieval_input_exits_2_with_the_fix(capsys, argv, words):
    code, out, err = run_cli(capsys, "--budget", "20MB", "--model", "smollm2-135m", "--context", "4k", *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and words in err


# ------------------------------------------------------------------------------------- quality
def test_the_quality_counts_the_retrieved_tokens_at_the_proxys_key_energy(no_artifacts):
    p = plan("20MB", "smollm2-135m", context="4k", new_tokens=16, dtype="fp32", token_policy="retrieval")
    q, mm = p.quality_model, p.memory_model
    assert p.quality_model.kind == "default" and "at the key energy its rank-channel proxy keeps" in p.quality_source
    low, high = (dataclasses.replace(mm, rank=r) for r in (4, 32))
    assert score(low, q, 64, 500) < score(high, q, 64, 500) < q(1.0, (68 + 500) / mm.seen, "retrieval")
    assert score(high, q, 64, 500) == q(1.0, (68 + 500 * q.channel_energy(0.5)) / mm.seen, "h2o")
    assert score(low, q, 64, None) == q(1.0, 1.0, "retrieval") == 1.0

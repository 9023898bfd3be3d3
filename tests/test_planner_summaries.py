"""kvtool plan for the block summaries (BalanceKV, uniform sampling): the planner's copy of the policies, the bytes
of a plan against the cache it builds, the search for the peak, the preset, the quality source and the errors."""

import json
import types

import pytest
from planner_helpers import run_cli, run_planned_cache, tiny_arch_model
from tiny_models import make_tiny_model

from kvpress_aqua.core.accounting import layer_nbytes
from kvpress_aqua.planner import quality as quality_model
from kvpress_aqua.planner import timeline
from kvpress_aqua.planner.search import MemoryModel, plan, resolve_model
from kvpress_aqua.planner.summaries import MAX_HALVINGS, SUMMARY_KNOBS, SUMMARY_POLICIES, summary_slots
from kvpress_aqua.policies import BalanceKV, Uniform
from kvpress_aqua.policies.registry import POLICY_TYPES
from kvpress_aqua.presets.spec import parse_policy


# ------------------------------------------------------------------------- the planner's copy of the policies
@pytest.mark.parametrize("name,cls", [("balancekv", BalanceKV), ("uniform", Uniform)])
def test_the_planners_knobs_and_slots_are_the_policys(name, cls):
    row = POLICY_TYPES[name]
    assert name in SUMMARY_POLICIES and row.load() is cls
    assert row.kind == "token" and not row.split and not row.needs_scores and cls.weights_slots
    assert {knob: getattr(cls(), knob) for knob in SUMMARY_KNOBS} == dict(SUMMARY_KNOBS)
    for halvings in range(1, MAX_HALVINGS + 1):
        policy = cls(halvings=halvings)
        assert [summary_slots(t, halvings) for t in range(0, 1500, 7)] == [policy.held(t) for t in range(0, 1500, 7)]
    with pytest.raises(ValueError, match="multiple of 2\\*\\*halvings"):
        cls(halvings=MAX_HALVINGS + 1)


# ------------------------------------------------------------------------------------------ the peak
def _every_start(first, step, count):
    return range(first, first + count * step, step)


@pytest.mark.parametrize("context,chunk,new_tokens", [(5000, 256, 300), (4097, 1000, 1), (3000, 100, 2),
                                                      (700, None, 260), (1, None, 1), (3000, 1, 5)])
@pytest.mark.parametrize("halvings", [1, 3, 7])
def test_the_peak_searched_over_the_last_steps_is_the_peak_over_every_step(monkeypatch, context, chunk, new_tokens,
                                                                           halvings):
    mm = MemoryModel(resolve_model("smollm2-135m"), 2, context, new_tokens, "bf16", chunk, 0, "uniform")

    def peaks():
        return [(m.kv, m.max_kv, m.peak_kv, m.attention, m.activations, m.copy, m.total)
                for m in (mm.evaluate(key_dim, halvings) for key_dim in (64, 32))]

    found = peaks()
    monkeypatch.setattr(timeline, "last_starts", _every_start)
    monkeypatch.setattr(timeline, "maximal", lambda pairs: [payload for _, _, payload in pairs])
    assert peaks() == found


def test_the_knobs_are_the_halvings_that_reduce_something_cheapest_first():
    mm = MemoryModel(resolve_model("smollm2-135m"), 1, 4096, 1, "fp32", 512, 0, "balancekv")
    assert list(mm.knobs(64)) == [7, 6, 5, 4, 3, 2, 1] and mm.keeps_rate
    assert [mm.held(h) for h in (7, 2, 1)] == [64 + 31 * 1 + 64, 64 + 31 * 32 + 64, 64 + 31 * 64 + 64]
    assert list(mm.knobs(1000)) == [2, 1]  # the others hold fewer tokens than that
    cache = [mm.evaluate(64, h).cache_peak for h in mm.knobs(64)]
    assert cache == sorted(cache) and cache[-1] < mm.evaluate(64, None).cache_peak
    short = MemoryModel(resolve_model("smollm2-135m"), 1, 191, 1, "fp32", None, 0, "uniform")
    assert list(short.knobs(1)) == []  # no block of the middle is ever full: nothing to reduce
    slot = layer_nbytes(1, 1, 1, 64, 64, 4, compressed=True) - 4  # keys, values, index, valid of one slot
    weighted = layer_nbytes(1, 1, 1, 64, 64, 4, compressed=True, weighted=True) - 4
    assert weighted == slot + 4  # the float32 log-weight
    assert mm.evaluate(64, 2).kv == 30 * (3 * mm.held(2) * weighted + 4)


# ----------------------------------------------------------------- measured against the real cache
RUNS = [("llama", 2, 450, 6, 100), ("qwen3", 1, 400, 140, None), ("llama-mqa", 3, 333, 1, 64),
        ("qwen2", 1, 700, 3, 300), ("gemma", 2, 420, 20, 128)]
"""(arch, batch, context, new tokens, prefill chunk): ``gemma`` is tiny_models' (2 layers, head_dim 16), the others
planner_helpers' (3 layers, head_dim 32); chunk ``None`` is searched; ``qwen3``'s decoding crosses a block."""


@pytest.mark.parametrize("name", SUMMARY_POLICIES)
@pytest.mark.parametrize("arch,batch,context,new_tokens,chunk", RUNS)
def test_planned_bytes_are_the_bytes_the_cache_holds(name, arch, batch, context, new_tokens, chunk):
    model = make_tiny_model("gemma") if arch == "gemma" else tiny_arch_model(arch)
    shape = resolve_model(model.config)
    mm = MemoryModel(shape, batch, context, new_tokens, "fp32", chunk, 0, name)
    budget = mm.evaluate(shape.info.head_dim, 2).cache_peak  # room for halvings 2 with every key channel
    p = plan(budget, model.config, context=context, batch=batch, new_tokens=new_tokens, dtype="fp32",
             prefill_chunk=chunk, overhead=0, token_policy=name, min_tokens=8)
    assert p.fits and p.recommendation.halvings and p.recommendation.memory.cache_peak <= budget
    aqua = [c for c in p.candidates if c.fits and c.k_ratio < 1 and c.halvings]
    for c in [p.recommendation, *aqua[-1:]]:
        assert c.entries[0] == {"type": name, "halvings": c.halvings, **SUMMARY_KNOBS} and c.token_budget is None
        assert c.held == summary_slots(mm.seen, c.halvings) and c.retained == c.held / mm.seen
        nbytes, held = run_planned_cache(model, c, batch, context, new_tokens)
        assert (nbytes, held) == (c.memory.cache_bytes, c.memory.max_kv), (c.k_ratio, c.halvings, c.prefill_chunk)
    assert any(c.k_ratio < 1 for c in [p.recommendation, *aqua])


# ------------------------------------------------------------------------------------- the command
def test_cli_plans_balancekv_and_its_preset_parses_and_builds(capsys, monkeypatch, no_artifacts, tmp_path):
    path = tmp_path / "plan.toml"
    argv = ("--budget", "40MB", "--model", "smollm2-135m", "--context", "4k", "--new-tokens", "16", "--dtype", "fp32",
            "--token-policy", "balancekv")
    code, out, _ = run_cli(capsys, *argv, "--emit-preset", str(path), "--json")
    data = json.loads(out)
    best = data["recommendation"]
    assert code == 0 and data["token_policy"] == "balancekv" and best["token_budget"] is None
    assert best["policies"][0] == {"type": "balancekv", "halvings": best["halvings"], **SUMMARY_KNOBS}
    assert best["tokens_held"] == summary_slots(4096 + 15, best["halvings"]) and best["cache_peak_bytes"] <= 40 * 10**6
    assert f"halvings {best['halvings']} (1/{2 ** best['halvings']} of the middle" in data["message"]
    assert "balancekv is not measured by any sweep" in data["quality_source"] and data["quality_metric"] == "heuristic"
    assert any("keeps a rate, not a budget" in note for note in data["notes"])
    spec = parse_policy(str(path))
    assert spec.entries == tuple(best["policies"]) and spec.prefill_chunk == best["prefill_chunk"]
    token, *channels = spec.build()
    assert token == BalanceKV(halvings=best["halvings"])
    assert [c.k_ratio for c in channels] == [e["k_ratio"] for e in best["policies"][1:]]
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli(capsys, *argv)
    lines = out.splitlines()
    assert code == 0 and "fewest halvings that fit, per k_ratio" in out and max(map(len, lines)) <= 80
    assert any(line.split()[:4] == ["k_ratio", "keys", "halv", "tokens"] for line in lines)
    row = [f"{best['k_ratio']:g}", str(best["key_dim"]), str(best["halvings"]), f"{best['tokens_held']:,}"]
    assert any(line.split()[:4] == row and line.split()[-1] == "recommended" for line in lines)


def test_an_infeasible_budget_is_one_line_that_names_the_fix(capsys, no_artifacts):
    argv = ("--budget", "5MB", "--model", "smollm2-135m", "--context", "32k", "--dtype", "fp32", "--token-policy",
            "uniform")
    code, out, _ = run_cli(capsys, *argv, "--json")
    message = json.loads(out)["message"]
    assert code == 1 and "\n" not in message and message.startswith("does not fit: needs ")
    assert "of KV cache even at k_ratio 0.25 keeping halvings 7 (1/128 of the middle" in message
    assert "you have 4.77 MiB (5,000,000 B)" in message
    assert "the largest context that fits at batch 1 is " in message and "--token-policy h2o fits" in message
    assert plan("5MB", "smollm2-135m", context="32k", dtype="fp32", token_policy="h2o").fits
    code, out, _ = run_cli(capsys, *argv)
    assert code == 1 and message in " ".join(out.split())


def test_a_model_with_sliding_window_layers_is_refused_in_one_line(capsys):
    code, out, err = run_cli(capsys, "--budget", "8GB", "--model", "gemma-2-9b", "--context", "8k", "--token-policy",
                             "uniform")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "sliding-window layers of gemma-2-9b" in err and "--token-policy h2o, sliding, snapkv, tova" in err


def test_the_quality_source_says_a_block_summary_is_unmeasured(monkeypatch, tmp_path):
    artifact = types.SimpleNamespace(spectrum=[[[2.0, 1.0, 0.5, 0.1]]], path=tmp_path / "a.safetensors",
                                     check_model=lambda info: None)
    monkeypatch.setattr(quality_model, "find_artifact", lambda info, framework: artifact)
    info = resolve_model("smollm2-135m").info
    summary, h2o = (quality_model.find_quality(info, None, name) for name in ("uniform", "h2o"))
    assert summary.kind == h2o.kind == "spectrum" and "no calibration sweep" in summary.source
    assert summary.source == (f"{h2o.source}; uniform is not measured by any sweep (they measure h2o): it is ranked "
                              "on the position-only token-retention curve (the sliding window's) at the fraction of "
                              "tokens it holds")
    assert summary(1.0, 0.5, "uniform") == summary(1.0, 0.5, "sliding") < summary(1.0, 0.5, "h2o")

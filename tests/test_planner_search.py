"""kvtool plan, the search: the quality sources, calibration artifacts, the "does not fit" analysis, presets
and every registered token policy, through the Python ``plan()``."""

import dataclasses
import functools
import types
from unittest import mock

import numpy as np
import pytest
import torch
from planner_helpers import run_cli

from kvpress_aqua.artifacts.aqua import AquaArtifact
from kvpress_aqua.planner import quality as quality_model
from kvpress_aqua.planner.search import CHUNK_CHOICES, QualityModel, plan, plannable_token_policies, resolve_model
from kvpress_aqua.policies import registry
from kvpress_aqua.policies.registry import POLICY_TYPES, policy_names, policy_type, token_entry
from kvpress_aqua.presets.spec import parse_policy


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


@pytest.mark.parametrize("name", [*(n for n in plannable_token_policies() if policy_type(n).split), "streaming"])
def test_every_registered_token_policy_with_a_budget_is_planned(no_artifacts, tmp_path, name):
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


def test_the_plannable_policies_are_the_registrys_token_rows_with_a_budget_the_block_summaries_and_retrieval():
    rows = POLICY_TYPES.values()
    budgeted = {r.name for r in rows if r.kind == "token" and r.split}
    assert plannable_token_policies() == tuple(sorted(budgeted | {"balancekv", "uniform", "retrieval"}))
    assert {"h2o", "tova", "sliding"} <= budgeted
    rate = dataclasses.replace(policy_type("h2o"), name="rate-only", split=())  # no budget, and no block summary
    with mock.patch.dict(POLICY_TYPES, {"rate-only": rate}), mock.patch.dict(registry._BY_NAME, {"rate-only": rate}):
        assert "rate-only" not in plannable_token_policies()
        with pytest.raises(ValueError, match="is no block summary nor retrieval.*--token-policy"):
            plan("8GB", "smollm2-135m", context=1024, token_policy="rate-only")


def test_bad_python_arguments_raise_value_error():
    for kwargs in ({"batch": 0}, {"new_tokens": -1}, {"context": 0}, {"prefill_chunk": 0}, {"dtype": "fp7"},
                   {"token_policy": "lru"}, {"budget": "-8GB"}, {"overhead": "-1GB"}):
        with pytest.raises(ValueError):
            plan(**{"budget": "8GB", "model": "smollm2-135m", "context": 1024, **kwargs})

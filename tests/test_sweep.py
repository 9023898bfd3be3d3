"""The calibration sweep: measured on a tiny model, stored beside the artifact, read by the planner."""

import dataclasses
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from tiny_models import byte_tokenizer

from kvpress_aqua.artifacts.aqua import AquaArtifact
from kvpress_aqua.calibration import calibrate
from kvpress_aqua.cli import main
from kvpress_aqua.evaluation.perplexity import perplexity
from kvpress_aqua.evaluation.sweep import (
    QualitySweep,
    artifact_fingerprint,
    find_sweep,
    measure_sweep,
    sweep_path,
    token_entry,
)
from kvpress_aqua.planner.search import QualityModel, plan
from kvpress_aqua.policies import H2O
from kvpress_aqua.policies.aqua import Aqua
from kvpress_aqua.policies.registry import AQUA_EXACT_RECENT, AQUA_EXACT_SINKS

CALIBRATION_TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. " * 12
HELD_OUT = "Startups grow when founders talk to users, write code and ignore most of the noise around them. " * 4


@pytest.fixture
def tiny(tiny_model, tmp_path):
    """A tiny Llama, its byte tokenizer and a saved AQUA artifact calibrated on it."""
    model = tiny_model("llama")
    tokenizer = byte_tokenizer(model.config.vocab_size)
    artifact = calibrate(model, tokenizer, CALIBRATION_TEXT, tokens=512, chunk=128, progress=False, name="tiny")
    artifact.save(tmp_path / "tiny-llama.safetensors")
    return model, tokenizer, artifact


def test_token_entry_splits_like_the_presets():
    assert token_entry("h2o", 100) == {"type": "h2o", "heavy": 48, "recent": 48, "sinks": 4}
    assert token_entry("sliding", 100, max_sinks=2) == {"type": "sliding", "sinks": 2, "window": 98}


def _torch_fingerprint(projections):
    """The fingerprint as earlier versions computed it, from torch; sweeps already on disk carry it."""
    return hashlib.sha256(projections.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def test_artifact_fingerprint_is_the_same_from_numpy_and_torch(tiny):
    _, _, artifact = tiny
    expected = _torch_fingerprint(artifact.projections)
    assert artifact_fingerprint(artifact) == expected
    assert artifact_fingerprint(AquaArtifact.load(artifact.path)) == expected
    as_numpy = AquaArtifact.load(artifact.path, framework="np")
    assert isinstance(as_numpy.projections, np.ndarray) and artifact_fingerprint(as_numpy) == expected
    for projections in (artifact.projections.transpose(-2, -1), artifact.projections.bfloat16()):
        assert artifact_fingerprint(dataclasses.replace(artifact, projections=projections)) == _torch_fingerprint(
            projections)  # non-contiguous and non-float32 tensors too
    assert artifact_fingerprint(dataclasses.replace(artifact, projections=artifact.projections[:1])) != expected


def test_sweep_measures_each_point_with_the_cache_in_the_loop(tiny):
    model, tokenizer, artifact = tiny
    sweep = measure_sweep(model, tokenizer, artifact, HELD_OUT, k_ratios=(1, 0.5), retained=(1, 0.5), tokens=96,
                          chunk=16, source="test text")
    grid = {(p.k_ratio, p.retained): p for p in sweep.points}
    assert set(grid) == {(1.0, 1.0), (1.0, 0.5), (0.5, 1.0), (0.5, 0.5)}
    assert sweep.metadata["tokens"] == 96 and sweep.metadata["text_source"] == "test text"
    ids = torch.tensor(tokenizer(HELD_OUT, add_special_tokens=False)["input_ids"][:96])
    full = perplexity(model, ids, (), chunk=16)
    both = perplexity(model, ids, [H2O(heavy=22, recent=22, sinks=4), Aqua(k_ratio=0.5, artifact=artifact)], chunk=16)
    point = grid[(0.5, 0.5)]
    assert point.token_budget == 48
    assert point.nll == pytest.approx(both.nll, rel=1e-9) and sweep.metadata["full_ppl"] == pytest.approx(full.ppl)
    assert point.quality == pytest.approx(math.exp(full.nll - both.nll), rel=1e-9)
    assert point.nll != full.nll  # the compression changed the predictions: the point measured something
    assert grid[(1.0, 1.0)].quality == 1.0


def test_sweep_beside_the_artifact_is_what_plan_uses(tiny):
    model, tokenizer, artifact = tiny
    sweep = measure_sweep(model, tokenizer, artifact, HELD_OUT, k_ratios=(1, 0.5, 0.25), retained=(1, 0.5),
                          tokens=64, chunk=16)
    path = sweep.save(sweep_path(artifact.path))
    assert path.name == "tiny-llama.sweep.json" and path.parent == artifact.path.parent
    loaded = QualitySweep.load(path)
    assert loaded.points == sweep.points and loaded.metadata == sweep.metadata
    assert find_sweep(artifact)[0] is not None

    p = plan("1GB", model.config, context=200, dtype="fp32", overhead=0, artifact=artifact.path)
    assert p.quality_model.kind == "sweep" and str(path) in p.quality_source
    assert p.to_dict()["quality_kind"] == "sweep"
    for point in sweep.points:
        assert p.quality_model(point.k_ratio, point.retained) == pytest.approx(min(1.0, point.quality))

    # another eviction policy than the one measured: the sweep is not used, and the source says why
    sliding = plan("1GB", model.config, context=200, dtype="fp32", overhead=0, artifact=artifact.path,
                   token_policy="sliding")
    assert sliding.quality_model.kind == "spectrum"
    assert "it measured h2o, the plan uses sliding" in sliding.quality_source


def test_a_sweep_of_another_calibration_is_ignored(tiny, tmp_path):
    model, tokenizer, artifact = tiny
    measure_sweep(model, tokenizer, artifact, HELD_OUT, k_ratios=(1, 0.5), retained=(1,), tokens=32,
                  chunk=16).save(sweep_path(artifact.path))
    recalibrated = calibrate(model, tokenizer, HELD_OUT, tokens=256, chunk=64, progress=False, name="tiny")
    recalibrated.save(artifact.path)
    found, why = find_sweep(recalibrated)
    assert found is None and "another calibration" in why
    p = plan("1GB", model.config, context=200, dtype="fp32", overhead=0, artifact=artifact.path)
    assert p.quality_model.kind == "spectrum" and "another calibration" in p.quality_source


def test_a_sweep_measured_with_other_exact_tokens_is_ignored(tiny):
    model, tokenizer, artifact = tiny
    sweep = measure_sweep(model, tokenizer, artifact, HELD_OUT, k_ratios=(1, 0.5), retained=(1,), tokens=32, chunk=16)
    del sweep.metadata["aqua_exact_recent"]  # as a sweep written before AQUA kept exact tokens
    sweep.save(sweep_path(artifact.path))
    found, why = find_sweep(artifact, exact_tokens=(AQUA_EXACT_SINKS, AQUA_EXACT_RECENT))
    assert found is None and "exact sinks/recent tokens (4, None)" in why
    assert find_sweep(artifact)[0] is not None  # the format alone does not judge the exact tokens: its caller does
    p = plan("1GB", model.config, context=200, dtype="fp32", overhead=0, artifact=artifact.path)
    assert p.quality_model.kind == "spectrum" and "exact sinks/recent tokens (4, None)" in p.quality_source


def test_sweep_quality_extends_pessimistically_below_the_grid():
    model = QualityModel.from_sweep([{"k_ratio": 0.5, "retained": 0.25, "quality": 0.4},
                                     {"k_ratio": 0.5, "retained": 1.0, "quality": 0.8},
                                     {"k_ratio": 1.0, "retained": 0.25, "quality": 0.6},
                                     {"k_ratio": 1.0, "retained": 1.0, "quality": 1.01}], "grid")
    assert model(1.0, 1.0) == 1.0  # measured a hair above the full cache: clamped
    assert model(1.0, 0.125) == pytest.approx(0.3)  # half way from (0, 0) to (0.25, 0.6)
    assert model(0.25, 1.0) == pytest.approx(0.4)  # half way from (0, 0) to (0.5, 0.8)


def test_bad_grid_and_too_little_text_are_refused(tiny):
    model, tokenizer, artifact = tiny
    with pytest.raises(ValueError, match="fractions in"):
        measure_sweep(model, tokenizer, artifact, HELD_OUT, k_ratios=(1.5,), tokens=32)
    with pytest.raises(ValueError, match="at least 8 tokens"):
        measure_sweep(model, tokenizer, artifact, "abc", tokens=32)


def test_cli_calibrate_sweep_writes_the_sidecar(tiny_model, tmp_path, monkeypatch, capsys):
    from kvpress_aqua import loading

    model = tiny_model("llama")  # `kvtool calibrate` loads its model through kvpress_aqua.loading.load_model
    tokenizer = byte_tokenizer(model.config.vocab_size)
    monkeypatch.setattr(loading, "load_model", lambda name=None, **kwargs: (model, tokenizer))
    (tmp_path / "cal.txt").write_text(CALIBRATION_TEXT)
    (tmp_path / "held.txt").write_text(HELD_OUT)
    out = tmp_path / "tiny.safetensors"
    code = main(["calibrate", "--text", str(tmp_path / "cal.txt"), "--tokens", "256", "--out", str(out), "--sweep",
                 "--sweep-tokens", "48", "--sweep-text", str(tmp_path / "held.txt"), "--needle-length", "0", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["sweep"]["path"] == str(tmp_path / "tiny.sweep.json")
    assert "needle" not in summary and not (tmp_path / "tiny.needle.json").exists()  # --needle-length 0 skips it
    stored = json.loads((tmp_path / "tiny.sweep.json").read_text())
    assert stored["tokens"] == 48 and stored["text_source"] == f"file {tmp_path / 'held.txt'}"
    assert len(stored["points"]) == 20 and {p["k_ratio"] for p in stored["points"]} == {1, 0.75, 0.5, 0.375, 0.25}
    assert summary["sweep"]["points"] == [{k: p[k] for k in ("k_ratio", "retained", "quality")}
                                          for p in stored["points"]]


def test_cli_calibrate_sweep_bad_text_exits_2(tmp_path, capsys):
    code = main(["calibrate", "--sweep", "--sweep-text", str(tmp_path / "missing.txt")])
    assert code == 2 and "missing.txt does not exist" in " ".join(capsys.readouterr().err.split())



def test_needle_sweep_scores_each_grid_point_and_the_planner_ranks_by_it(tiny, monkeypatch):
    from kvpress_aqua.data.haystack import load_haystack
    from kvpress_aqua.evaluation import sweep as sweep_module

    model, tokenizer, artifact = tiny
    seen = {}

    def fake_run_cells(model, tokenizer, cells, specs, config, on_row):
        """Scores from the spec alone (a tiny random model recalls no passkey): 1 full, k_ratio x kept else."""
        for cell in cells:
            spec = specs[cell.policy]
            seen[cell.policy] = (spec.entries, cell.protocol, cell.length, config.prefill_chunk)
            k = next((e["k_ratio"] for e in spec.entries if e["type"] == "aqua"), 1.0)
            kept = next((e["heavy"] + e["recent"] + e["sinks"] for e in spec.entries if e["type"] == "h2o"), 64)
            on_row({"policy": cell.policy, "score": 0.5 * k * kept / 64, "seconds": 0.1})

    monkeypatch.setattr(sweep_module, "run_cells", fake_run_cells)
    sweep = sweep_module.measure_needle_sweep(model, tokenizer, artifact, load_haystack("noise"), k_ratios=(1, 0.5),
                                              retained=(1, 0.25), length=64, depths=(10, 90), prefill_chunk=16)
    assert sweep.metadata["metric"] == "needle" and sweep.metadata["full_score"] == 0.5
    entries, protocol, length, chunk = seen["k0.5-r0.25"]
    assert entries == (token_entry("h2o", 16), {"type": "aqua", "k_ratio": 0.5, "artifact": str(artifact.path)})
    assert (protocol, length, chunk) == ("context-first", 64, 16) and len(seen) == 4
    quality = {(p.k_ratio, p.retained): p.quality for p in sweep.points}
    assert quality == {(1.0, 1.0): 1.0, (1.0, 0.25): 0.25, (0.5, 1.0): 0.5, (0.5, 0.25): 0.125}
    assert all(p.ppl is None and p.score == pytest.approx(0.5 * p.quality) for p in sweep.points)
    path = sweep.save(sweep_path(artifact.path, "needle"))
    assert path.name == "tiny-llama.needle.json" and find_sweep(artifact, metric="needle")[0] is not None
    assert find_sweep(artifact)[0] is None  # the perplexity sweep is another file
    measure_sweep(model, tokenizer, artifact, HELD_OUT, k_ratios=(1, 0.5), retained=(1,), tokens=32,
                  chunk=16).save(sweep_path(artifact.path))
    p = plan("1GB", model.config, context=200, dtype="fp32", overhead=0, artifact=artifact.path)
    assert p.quality_model.metric == "needle" and p.to_dict()["quality_metric"] == "needle"
    assert p.quality_source.startswith("needle sweep") and p.quality_model(0.5, 0.25) == pytest.approx(0.125)
    path.unlink()  # without it, the perplexity sweep is used, and the source says the needle sweep is missing
    ppl = plan("1GB", model.config, context=200, dtype="fp32", overhead=0, artifact=artifact.path)
    assert ppl.quality_model.metric == "perplexity" and "no needle sweep at" in ppl.quality_source


def test_needle_sweep_of_a_model_that_recalls_nothing_is_refused(tiny, monkeypatch):
    from kvpress_aqua.data.haystack import load_haystack
    from kvpress_aqua.evaluation import sweep as sweep_module

    model, tokenizer, artifact = tiny
    monkeypatch.setattr(sweep_module, "run_cells", lambda m, t, cells, specs, config, on_row: [
        on_row({"policy": c.policy, "score": 0.0, "seconds": 0.1}) for c in cells])
    with pytest.raises(ValueError, match="recalls no passkey of 64 tokens with the full cache"):
        sweep_module.measure_needle_sweep(model, tokenizer, artifact, load_haystack("noise"), length=64)

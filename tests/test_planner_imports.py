"""`kvtool plan` reads configs, not models: planning (with an artifact and its sweep) and writing its preset import
neither torch nor transformers, nor does the spec parser until a spec is checked or built, and the command completes
in a fresh process. (Its wall time is measured by hand, not here.)"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from kvpress_aqua.artifacts.aqua import AquaArtifact
from kvpress_aqua.artifacts.sweep import QualitySweep, SweepPoint, artifact_fingerprint, sweep_path
from kvpress_aqua.planner.search import resolve_model
from kvpress_aqua.policies.registry import AQUA_EXACT_RECENT, AQUA_EXACT_SINKS
from kvpress_aqua.presets.spec import parse_policy

HEAVY = ("torch", "transformers")


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"KVPRESS_AQUA_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)


def run_kvtool(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``kvtool ARGV`` in a fresh interpreter that reports, on stderr, which of :data:`HEAVY` it loaded."""
    code = f"""
import sys
from kvpress_aqua.cli import main
code = main({argv!r})
print("loaded:", [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)
sys.exit(code)
"""
    return run_python(code, tmp_path)


def smollm2_artifact(path: Path) -> Path:
    """An artifact keyed to SmolLM2-135M (identity bases), made with numpy only."""
    info = resolve_model("smollm2-135m").info
    layers, heads, d = info.num_layers, info.num_kv_heads, info.head_dim
    ones = np.ones((layers, heads, d), np.float32)
    return AquaArtifact(
        projections=np.broadcast_to(np.eye(d, dtype=np.float32), (layers, heads, d, d)),
        spectrum=np.broadcast_to(np.linspace(1.0, 0.1, d, dtype=np.float32), (layers, heads, d)),
        query_norms=ones, key_norms=ones,
        metadata={"model": info.name, "fingerprint": info.fingerprint, "num_layers": layers,
                  "num_heads": info.num_heads, "num_kv_heads": heads, "head_dim": d},
    ).save(path)


def test_planning_imports_neither_torch_nor_transformers(tmp_path):
    artifact = smollm2_artifact(tmp_path / "smol.safetensors")
    points = tuple(SweepPoint(k, r, None, 10.0, 2.3, q, 1.0) for k, r, q in [(1, 1, 1), (1, 0.5, 0.9), (0.5, 1, 0.8),
                                                                             (0.5, 0.5, 0.7)])
    meta = {"artifact_fingerprint": artifact_fingerprint(AquaArtifact.load(artifact, framework="np")),
            "token_policy": "h2o", "aqua_exact_sinks": AQUA_EXACT_SINKS, "aqua_exact_recent": AQUA_EXACT_RECENT}
    QualitySweep(points, meta).save(sweep_path(artifact))
    code = f"""
import json, sys
import kvpress_aqua.artifacts.aqua, kvpress_aqua.artifacts.sweep, kvpress_aqua.planner.config, kvpress_aqua.cli.plan
from kvpress_aqua.planner.search import plan
plans = [plan("8GB", "smollm2-135m", context="4k", new_tokens=16, prefill_chunk=512),
         plan("8GB", "smollm2-135m", context="4k", artifact={str(artifact)!r}),
         plan("8GB", "smollm2-135m", context="4k", artifact={str(artifact)!r}, token_policy="sliding")]
print(json.dumps({{"fits": [p.fits for p in plans], "kinds": [p.quality_model.kind for p in plans],
                  "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out == {"fits": [True] * 3, "kinds": ["default", "sweep", "spectrum"], "loaded": []}


def test_kvtool_plan_json_completes_in_a_fresh_process(tmp_path):
    argv = ["plan", "--budget", "8GB", "--model", "smollm2-135m", "--context", "4k", "--json"]
    script = Path(sys.executable).with_name("kvtool")
    env = {"KVPRESS_AQUA_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["fits"] and data["model"]["layers"] == 30 and data["context"] == 4096
    inline = run_kvtool(argv, tmp_path)
    assert inline.returncode == 0 and "loaded: []" in inline.stderr, inline.stderr
    assert json.loads(inline.stdout) == data


def test_the_spec_module_and_to_toml_import_no_torch(tmp_path):
    code = f"""
import json, sys
import kvpress_aqua.presets.spec as spec
text = spec.PolicySpec("p", ({{"type": "tova", "heavy": 8, "recent": 8, "sinks": 4}},
                             {{"type": "aqua", "k_ratio": 0.5}})).to_toml()
print(json.dumps({{"toml": text, "relative": spec.PolicySpec("q", ({{"type": "h2o", "kv_fraction": 0.5}},)).is_relative,
                  "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["loaded"] == [] and out["relative"] is True
    assert 'type = "tova"' in out["toml"] and "k_ratio = 0.5" in out["toml"]


def test_kvtool_plan_emits_a_tova_preset_without_torch(tmp_path):
    preset = tmp_path / "plan.toml"
    argv = ["plan", "--budget", "1.2GB", "--model", "smollm2-135m", "--context", "32k", "--dtype", "fp32",
            "--prefill-chunk", "512", "--token-policy", "tova", "--emit-preset", str(preset), "--json"]
    result = run_kvtool(argv, tmp_path)
    assert result.returncode == 0 and "loaded: []" in result.stderr, result.stderr
    data = json.loads(result.stdout)
    assert data["token_policy"] == "tova"
    token = data["recommendation"]["policies"][0]
    assert token["type"] == "tova" and token["heavy"] + token["recent"] + token["sinks"] == data["recommendation"][
        "token_budget"]
    spec = parse_policy(str(preset))
    assert spec.entries == tuple(data["recommendation"]["policies"])
    assert [type(p).__name__ for p in spec.build()][0] == "TOVA"


def test_kvtool_plan_emits_a_balancekv_preset_without_torch(tmp_path):
    preset = tmp_path / "plan.toml"
    argv = ["plan", "--budget", "40MB", "--model", "smollm2-135m", "--context", "4k", "--dtype", "fp32",
            "--token-policy", "balancekv", "--emit-preset", str(preset), "--json"]
    result = run_kvtool(argv, tmp_path)
    assert result.returncode == 0 and "loaded: []" in result.stderr, result.stderr
    best = json.loads(result.stdout)["recommendation"]
    assert best["policies"][0]["type"] == "balancekv" and best["policies"][0]["halvings"] == best["halvings"] >= 1
    assert parse_policy(str(preset)).entries == tuple(best["policies"])

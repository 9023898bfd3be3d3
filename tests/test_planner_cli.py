"""kvtool plan on the command line: bad input, tables, JSON, and the design card's example (KV budget, device
memory, prefill chunk)."""

import dataclasses
import json

import pytest
from planner_helpers import run_cli

from kvpress_aqua.planner import model_shape
from kvpress_aqua.planner.search import CHUNK_CHOICES, candidate_key_dims, plan
from kvpress_aqua.presets.spec import parse_policy
from kvpress_aqua.util.sizes import format_bytes


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

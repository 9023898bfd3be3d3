"""A preset written by ``kvtool plan`` carries its prefill chunk, and the commands that build caches from it use it."""

import argparse

import pytest

from kvpress_aqua.cli._needle_run import add_model_arguments, run_config
from kvpress_aqua.planner.search import plan
from kvpress_aqua.presets.spec import PolicySpec, parse_policy


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def planned(tmp_path, monkeypatch):
    """The design card's plan at chunk 256 written as a preset (no AQUA artifact in the cache), and its chunk."""
    monkeypatch.setenv("KVPRESS_AQUA_CACHE", str(tmp_path / "cache"))
    p = plan("8GB", "llama-3.1-8b", context="128k", batch=4, prefill_chunk=256)
    path = tmp_path / "plan.toml"
    path.write_text(p.to_toml())
    return parse_policy(str(path)), p.recommendation.prefill_chunk


def test_needle_runs_a_plan_with_its_chunk_unless_one_is_given(planned):
    spec, chunk = planned
    assert chunk == spec.prefill_chunk == 256
    specs = {"plan": spec, "full": parse_policy("full")}
    assert run_config(_args(), "m", "noise", specs.values()).prefill_chunk == chunk
    assert run_config(_args("--prefill-chunk", "1k"), "m", "noise", specs.values()).prefill_chunk == 1024
    assert run_config(_args("--prefill-chunk", "none"), "m", "noise", specs.values()).prefill_chunk is None
    no_plan = {"h2o": PolicySpec("h2o", ({"type": "h2o", "heavy": 8, "recent": 8},))}
    assert run_config(_args(), "m", "noise", no_plan.values()).prefill_chunk == 512  # the default without a plan

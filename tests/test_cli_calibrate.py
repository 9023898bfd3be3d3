"""kvtool calibrate: ``--device``, ``--dtype`` and ``--threads`` reach the model load (the helper every model command
shares), and the recording of queries and keys shows a progress bar counted in tokens."""

import json

import pytest
import torch
from tiny_models import byte_tokenizer, make_tiny_model

from kvpress_aqua import loading
from kvpress_aqua.artifacts.aqua import AquaArtifact
from kvpress_aqua.calibration import calibrate
from kvpress_aqua.cli import main

TEXT = "The keeper of the lighthouse logs each ship, the wind and the tide before dawn. " * 4  # 320 bytes


@pytest.fixture
def threads():
    """Torch's CPU thread count, restored after the test (``--threads`` sets it for the process)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_runtime_options_reach_the_load_and_the_bar_counts_the_tokens(tmp_path, monkeypatch, capsys, threads):
    model = make_tiny_model("llama")
    tokenizer = byte_tokenizer(model.config.vocab_size)
    loaded = {}

    def load(name=None, **kwargs):
        loaded.update(kwargs, threads=torch.get_num_threads())  # threads are set before the model loads
        return model, tokenizer

    monkeypatch.setattr(loading, "load_model", load)
    (tmp_path / "cal.txt").write_text(TEXT)
    out = tmp_path / "tiny.safetensors"
    code = main(["calibrate", "--text", str(tmp_path / "cal.txt"), "--tokens", "16k", "--chunk", "64", "--out",
                 str(out), "--device", "cpu", "--dtype", "bf16", "--threads", "1", "--json"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert code == 0 and loaded == {"device": "cpu", "dtype": "bf16", "threads": 1}
    assert summary["tokens"] == len(TEXT) == AquaArtifact.load(out).metadata["tokens"]
    # the bar goes to stderr under --json; the text is shorter than --tokens, and the bar's total follows it
    assert "recording queries and keys (tokens)" in captured.err and f" {len(TEXT)}/{len(TEXT)} " in captured.err


def test_calibrate_reports_each_chunk():
    model = make_tiny_model("llama")
    calls = []
    calibrate(model, byte_tokenizer(model.config.vocab_size), TEXT, tokens=200, chunk=64, progress=False,
              on_chunk=lambda n, total: calls.append((n, total)))
    assert calls == [(64, 200), (64, 200), (64, 200), (8, 200)]


def test_help_lists_the_runtime_options(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--device DEVICE" in text and "--dtype DTYPE" in text and "--threads THREADS" in text

"""kvtool's errors: one plain line, the input verbatim, exit 2, before any model loads; a light parser."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from kvpress_aqua import loading
from kvpress_aqua.cli import main
from kvpress_aqua.cli.calibrate import SWEEP_TOKENS_HELP
from kvpress_aqua.cli.common import check_device, check_threads, one_line

REPO = Path(__file__).parents[1]


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: every check must run before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_model", refuse)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.mark.parametrize("argv,shown", [
    pytest.param(["needle", "--device", "cuda"], "--device cuda: this machine has no cuda device", marks=NO_CUDA),
    pytest.param(["demo", "--device", "cuda:0"], "--device cuda:0", marks=NO_CUDA),
    (["needle", "--device", "foo"], "--device foo: not a torch device; use cpu, cuda, cuda:N or mps"),
    (["demo", "--device", "foo"], "--device foo: not a torch device"),
    (["ppl", "--threads", "0"], "--threads 0: give a positive number of CPU threads"),
    (["ppl", "--threads", "-3"], "--threads -3"),
    (["needle", "--threads", "0"], "--threads 0"),
    (["demo", "--threads", "0"], "--threads 0"),
    (["ppl", "--chunk", "0"], "--chunk 0"),
    (["needle", "--policy", "h2o:heavy=1.5,recent=2"], "policy 'h2o:heavy=1.5,recent=2': bad knobs for h2o: "
                                                       "heavy = 1.5 must be an integer"),
    (["needle", "--policy", "h2o:heavy=true,recent=2"], "heavy = true must be an integer"),
    (["needle", "--policy", "h2o:heavvy=3"], "unknown knob 'heavvy' = 3 (did you mean 'heavy'?); h2o takes heavy"),
    (["ppl", "--policy", "h2o:kv=2"], "kv = 2"),
    (["generate", "--policy", "tova:heavy=4"], "tova needs recent"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["generate", "--prefill-chunk", "0"], "--prefill-chunk 0"),
    (["generate", "--compile"], "--compile replays each decode step as a CUDA graph: add --device cuda"),
    (["needle", "--compile"], "--compile replays each decode step as a CUDA graph: add --device cuda (got --device "
                              "cpu)"),
    (["needle", "--lengths", "1k,zero"], "'zero'"),
    (["calibrate", "--text", "/nonexistent/cal.txt"], "calibration text /nonexistent/cal.txt does not exist"),
    (["calibrate", "--sweep-tokens", "0"], "the sweep tokens '0' must be at least 1"),
    (["calibrate", "--threads", "0"], "--threads 0: give a positive number of CPU threads"),
    (["calibrate", "--dtype", "fp7"], "--dtype fp7"),
    (["calibrate", "--device", "foo"], "--device foo: not a torch device"),
    pytest.param(["calibrate", "--device", "cuda"], "--device cuda: this machine has no cuda device", marks=NO_CUDA),
])
def test_bad_arguments_fail_in_one_line_before_the_model_loads(argv, shown, no_model, capsys, tmp_path):
    if argv[0] in ("needle", "demo"):
        argv = [*argv, "--haystack", "noise", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert shown in _error_line(capsys)


def test_user_input_is_printed_verbatim_on_one_line(no_model, capsys, tmp_path):
    # rich markup ate "[x]" and turned ":100:" into an emoji; rich also wrapped at 80 columns
    assert main(["needle", "--depths", "0:100:0", "--haystack", "noise", "--out", str(tmp_path)]) == 2
    line = _error_line(capsys)
    assert "'0:100:0'" in line and "\U0001f4af" not in line
    path = tmp_path / "[x]" / ("a-rather-long-folder-name-" * 4) / "policy.toml"
    assert main(["needle", "--policy", str(path), "--out", str(tmp_path)]) == 2
    assert _error_line(capsys) == f"error: policy file {str(path)!r} does not exist"


def test_plot_install_hint_keeps_its_brackets(tmp_path, capsys, monkeypatch):
    from kvpress_aqua.cli._needle_run import write_plots
    from kvpress_aqua.cli.common import make_console
    from kvpress_aqua.evaluation.needle import plots

    def missing(*args, **kwargs):
        raise ImportError("plots need matplotlib: pip install 'kvpress-aqua[plot]' (or pass --no-plots)")

    monkeypatch.setattr(plots, "plot_heatmaps", missing)
    assert write_plots([], tmp_path, "m", make_console()) == []
    assert "pip install 'kvpress-aqua[plot]'" in capsys.readouterr().out


def test_an_offline_hub_id_fails_fast_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("from_pretrained"))
    assert main(["generate", "--model", "foo/bar"]) == 2
    line = _error_line(capsys)
    assert "'foo/bar'" in line and "HF_HUB_OFFLINE is set" in line and "pass a local model directory" in line


def test_a_folder_without_weights_and_a_broken_model_fail_in_one_line(tmp_path, capsys, monkeypatch):
    make_tiny_model("llama").config.save_pretrained(tmp_path / "m")
    assert main(["generate", "--model", str(tmp_path / "m")]) == 2
    assert "no weights" in _error_line(capsys)

    def broken(*args, **kwargs):
        raise RuntimeError("Error while deserializing header:\nHeaderTooLarge")

    monkeypatch.setattr(loading, "load_model", broken)
    assert main(["ppl", "--model", "x", "--text", __file__]) == 2
    assert _error_line(capsys) == "error: cannot load model 'x': Error while deserializing header: HeaderTooLarge"


def test_checks():
    assert check_threads(None) is None and check_threads(3) == 3
    assert check_device("cpu") == "cpu"
    assert one_line("a\n  b\r\nc") == "a b c"


def _chat_tokenizer():
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 128)]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


def test_generate_passes_the_cache_without_future_warning(monkeypatch, capsys):
    model = make_tiny_model("llama")
    monkeypatch.setattr(loading, "load_model", lambda name=None, **kwargs: (model, _chat_tokenizer()))
    prompt = " ".join(f"w{i}" for i in range(5, 60))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        code = main(["generate", "--prompt", prompt, "--max-new-tokens", "3", "--json",
                     "--policy", "full", "--policy", "h2o:heavy=8,recent=8,sinks=2"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in rows] == ["full", "h2o:heavy=8,recent=8,sinks=2"]
    assert rows[1]["kv_bytes"] < rows[0]["kv_bytes"]
    assert [r["decode"] for r in rows] == ["eager", "eager"]


def test_sweep_tokens_help_matches_the_sweep_default():
    from kvpress_aqua.evaluation.sweep import DEFAULT_SWEEP_TOKENS

    assert SWEEP_TOKENS_HELP == DEFAULT_SWEEP_TOKENS


_LIGHT = """
import sys
{run}
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print("heavy modules: " + ",".join(heavy))
"""


@pytest.mark.parametrize("run", [
    "from kvpress_aqua.cli import build_parser; build_parser()",
    "from kvpress_aqua.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
])
def test_building_the_parser_and_help_import_no_torch(run):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _LIGHT.format(run=run)], capture_output=True, text=True, env=env,
                         cwd=REPO, check=True).stdout
    assert out.splitlines()[-1] == "heavy modules: ", out.splitlines()[-1]


def test_a_malformed_command_line_is_one_line_too(capsys):
    assert main(["needle", "--batch-size", "x"]) == 2
    assert _error_line(capsys) == ("error: kvtool needle: argument --batch-size: invalid int value: 'x'; see kvtool "
                                   "needle --help")
    assert main(["presets", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in _error_line(capsys)


@pytest.mark.parametrize("argv", [
    ["needle", "--batch-size", "x", "--json"],
    ["ppl", "--tokens", "8 GB", "--json"],
    ["generate", "--policy", "nope", "--json"],
])
def test_under_json_an_error_is_one_json_document_on_stdout(argv, no_model, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert json.loads(out) == {"error": err.removeprefix("error: ").rstrip("\n")}


def test_errors_stay_on_one_line_when_stderr_is_a_pipe(tmp_path):
    # rich used to wrap long errors at 80 columns when stderr was not a terminal
    path = tmp_path / ("a-rather-long-folder-name-" * 6) / "policy.toml"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-c", "import sys; from kvpress_aqua.cli import main; sys.exit(main())",
                           "generate", "--policy", str(path)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"error: policy file {str(path)!r} does not exist"]


def test_version(capsys):
    from kvpress_aqua._version import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"kvtool {__version__} (kvpress-aqua)"

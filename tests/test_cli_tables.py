"""kvtool's tables at 80 and 120 columns: no line wider, no ellipsis, every policy name and number whole."""

import json

import pytest
import torch
from test_cli_errors import _chat_tokenizer
from test_needle import CharTokenizer
from tiny_models import make_tiny_model

from kvpress_aqua import loading
from kvpress_aqua.cli import main
from kvpress_aqua.core.report import MemoryReport, MemoryRow

LONG = "h2o:heavy=24,recent=24,sinks=4"
"""An inline spec longer than the policy column at 80 columns: it must fold, not be cut."""
WIDTHS = (80, 120)


def _first_column(out: str) -> str:
    """The first column's cells of every table in ``out``, joined (a folded name is whole again)."""
    return "".join(line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│"))


def _check(out: str, width: int, names, numbers=()):
    assert out.strip(), "nothing printed"
    table = [line for line in out.splitlines() if any(c in line for c in "│┃┏└")]  # log lines may be longer
    assert table and max(len(line) for line in table) <= width, out
    assert "…" not in out, out
    column = _first_column(out)
    for name in names:
        assert name in column, (name, out)
    for number in numbers:
        assert number in out, (number, out)


@pytest.fixture
def tiny(monkeypatch):
    model = make_tiny_model("llama")

    def use(tokenizer):
        monkeypatch.setattr(loading, "load_model", lambda name=None, **kwargs: (model, tokenizer))

    return use


@pytest.mark.parametrize("width", WIDTHS)
def test_needle_table(width, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(width))
    tiny(CharTokenizer())
    argv = ["needle", "--policy", "full", "--policy", LONG, "--lengths", "700,800", "--depths", "50",
            "--task", "passkey,multikey", "--protocol", "context-first,query-aware", "--haystack", "noise",
            "--prefill-chunk", "128", "--no-plots", "--out", str(tmp_path)]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    out = capsys.readouterr().out
    assert "│ context-first │" in out and "│ query-aware   │" in out
    _check(out, width, ["full", LONG],
           [f"{s['score']:.2f}" for s in summary] + [f"{100 * s['kv_fraction']:.1f}" for s in summary])
    if width == 80:  # 11 columns do not fit 80: the task columns go to a second table, policy names again
        assert _first_column(out).count("full") == 4


@pytest.mark.parametrize("width", WIDTHS)
def test_ppl_table(width, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(width))
    tiny(CharTokenizer())
    text = tmp_path / "t.txt"
    text.write_text("Ships sail at dawn. Birds sing loudly! Is it late? " * 20)
    assert main(["ppl", "--text", str(text), "--tokens", "200", "--chunk", "50", "--policy", LONG]) == 0
    out = capsys.readouterr().out
    _check(out, width, ["full", LONG], ["+0.00"])


@pytest.mark.parametrize("width", WIDTHS)
def test_generate_table(width, tiny, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(width))
    tiny(_chat_tokenizer())
    prompt = " ".join(f"w{i}" for i in range(5, 100))
    assert main(["generate", "--prompt", prompt, "--max-new-tokens", "12", "--policy", "full", "--policy", LONG]) == 0
    _check(capsys.readouterr().out, width, ["full", LONG])


@pytest.mark.parametrize("width", WIDTHS)
def test_memory_report_splits_rather_than_cuts(width, capsys, monkeypatch):
    from kvpress_aqua.cli.common import make_console

    monkeypatch.setenv("COLUMNS", str(width))
    rows = tuple(MemoryRow(i, "compressed", 65536, 8_388_608, 150_000_000, 150_000_000, 3_000_000, 600_000_000)
                 for i in range(3))
    make_console().print(MemoryReport(rows, 1_000_000, 131072))
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= width and "…" not in out
    assert "143.05" in out and "8388608" in out and "compressed" in out
    assert out.count("┏") == (2 if width == 80 else 1)


def test_bytes_column_picks_one_unit():
    from kvpress_aqua.cli._tables import bytes_column

    assert bytes_column([512, 1000]) == ("KV B", ["512", "1000"])
    assert bytes_column([145_000_000, 2048, None]) == ("KV MiB", ["138.28", "0.00", "-"])
    assert torch.tensor(1).item() == 1

"""``kvtool presets``: every shipped preset listed with what it keeps, as a table (80 columns) and as JSON."""

import json

from kvpress_aqua.cli import main
from kvpress_aqua.presets.spec import list_presets, parse_policy


def test_presets_json_lists_every_preset_with_a_spec_that_parses_back(capsys):
    assert main(["presets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(list_presets())
    by_name = {r["name"]: r for r in rows}
    assert by_name["full"]["keeps"] == "everything (dense)"
    assert by_name["h2o-aqua-4x"]["keeps"] == "25% of dense KV bytes; tokens by h2o; keys on 50% of channels"
    assert by_name["streaming-1k"]["keeps"] == "tokens by sliding (sinks 4, window 1020)"
    for row in rows:  # the inline spec is the same stack as the preset
        assert parse_policy(row["spec"]).key == row["key"] == parse_policy(row["name"]).key


def test_presets_table_keeps_every_name_whole_at_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "…" not in out
    for name in list_presets():
        assert f"│ {name} " in out

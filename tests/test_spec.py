"""The one policy parser: presets, TOML files, inline strings, relative budgets, errors."""

import pytest

from kvpress_aqua.policies import H2O, TOVA, SlidingWindow
from kvpress_aqua.policies.aqua import Aqua
from kvpress_aqua.spec import list_presets, parse_policy


def test_inline_stack():
    spec = parse_policy("h2o:heavy=256,recent=64+aqua:k_ratio=0.5,q_ratio=0.75")
    token, channel = spec.build()
    assert token == H2O(heavy=256, recent=64)
    assert channel.k_ratio == 0.5 and channel.q_ratio == 0.75


def test_full_is_empty():
    assert parse_policy("full").is_full and parse_policy("full").build() == []


def test_every_shipped_preset_parses_and_builds():
    presets = list_presets()
    assert {"full", "h2o-25", "h2o-50", "streaming-25", "h2o-aqua-4x", "tova-25", "tova-50"} <= presets.keys()
    for name, description in presets.items():
        assert description
        spec = parse_policy(name)
        policies = spec.build(context=2048)
        assert all(isinstance(p, H2O | TOVA | SlidingWindow | Aqua) for p in policies)


@pytest.mark.parametrize("context", [1000, 4096])
def test_relative_budget_hits_the_byte_fraction(context):
    (window,) = parse_policy("streaming-25").build(context=context)
    assert window.budget == context // 4
    h2o, aqua = parse_policy("h2o-aqua-4x").build(context=context)
    # a token with half its key channels costs 3/4 of a dense one; each of the 68 exact tokens also
    # keeps its other half of the key channels, 1/4 of a dense token
    exact = aqua.exact_sinks + aqua.exact_recent
    assert exact == 68
    assert abs(h2o.budget * 0.75 + exact * 0.25 - 0.25 * context) <= 1
    assert h2o.sinks == 4 and aqua.k_ratio == 0.5
    h2o, _ = parse_policy("h2o:kv=0.25+aqua:k_ratio=0.5,exact_sinks=0,exact_recent=0").build(context=context)
    assert abs(h2o.budget * 0.75 - 0.25 * context) <= 1


def test_relative_budget_needs_context():
    with pytest.raises(ValueError, match="context"):
        parse_policy("h2o-25").build()


def test_toml_round_trip(tmp_path):
    spec = parse_policy("h2o:heavy=10,recent=5,sinks=2+aqua:k_ratio=0.25")
    path = tmp_path / "mine.toml"
    path.write_text(spec.to_toml())
    again = parse_policy(str(path))
    assert again.entries == spec.entries
    assert again.build() == spec.build()


@pytest.mark.parametrize("bad,match", [
    ("nonsense", "unknown policy"),
    ("h2o:heavy", "key=value"),
    ("h2o:heavy=1,bogus=3", "bad knobs"),
    ("missing.toml", "does not exist"),
    ("aqua:k_ratio=1.5", "k_ratio"),
])
def test_bad_specs(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_policy(bad).build()


def test_bad_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[[policy]]\ntype = 'teleport'\n")
    with pytest.raises(ValueError, match="unknown policy type"):
        parse_policy(str(path))

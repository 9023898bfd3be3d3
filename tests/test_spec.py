"""The one policy parser: presets, TOML files, inline strings, relative budgets, errors."""

import hashlib
import json
from pathlib import Path

import pytest

from kvpress_aqua.core.accounting import kv_fraction_budget
from kvpress_aqua.policies import H2O
from kvpress_aqua.policies.registry import policy_type
from kvpress_aqua.presets.spec import PolicySpec, list_presets, parse_policy, planned_prefill_chunk


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
        assert [type(p) for p in policies] == [policy_type(e["type"]).load() for e in spec.entries]


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
    h2o, _ = parse_policy("h2o:kv_fraction=0.25+aqua:k_ratio=0.5,exact_sinks=0,exact_recent=0").build(context=context)
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


# ------------------------------------------------------------------ full validation at parse time
def _toml(tmp_path, text, name="p.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text,match", [
    ("", r"no \[\[policy\]\] tables.*policy = \[\]"),
    ('description = "only words"\n', r"no \[\[policy\]\] tables"),
    ("[[policies]]\ntype = 'h2o'\nkv_fraction = 0.25\n",
     r"unknown top-level key 'policies'.*did you mean \[\[policy\]\]"),
    ("descripton = 'x'\npolicy = []\n", r"unknown top-level key 'descripton' = \"x\".*'description'"),
    ("[policy]\ntype = 'h2o'\nkv_fraction = 0.25\n", r"\[policy\] is a single table; write \[\[policy\]\]"),
    ("policy = 3\n", r"policy = 3 must be an array of tables"),
    ("policy = [1]\n", r"#1: a policy entry must be a table"),
    ("[[policy]]\nkv_fraction = 0.25\n", r"#1: no type; use type = one of aqua, "),
    ("[[policy]]\ntype = 'h2o'\nheavy = 1.5\nrecent = 2\n", r"#1: bad knobs for h2o: heavy = 1.5 must be an integer"),
    ("[[policy]]\ntype = 'h2o'\nheavy = true\nrecent = 2\n", r"heavy = true must be an integer"),
    ("[[policy]]\ntype = 'aqua'\nk_ratio = true\n", r"k_ratio = true must be a number"),
    ("[[policy]]\ntype = 'aqua'\nper_layer = 3\n", r"per_layer = 3 must be a string"),
    ("[[policy]]\ntype = 'h2o'\nkv_fraction = 1.5\n",
     r"kv_fraction = 1.5: the fraction of dense KV bytes kept must be in \(0, 1\]"),
    ("[[policy]]\ntype = 'aqua'\nkv_fraction = 0.5\n", r"unknown knob 'kv_fraction'"),
    ("[[policy]]\ntype = 'aqua'\nkv = 0.5\n", r"unknown knob 'kv'"),  # never a channel-policy knob
    ("prefill_chunk = 0\npolicy = []\n", r"prefill_chunk = 0 must be a positive whole number of tokens"),
    ("prefill_chunk = 512.5\npolicy = []\n", r"prefill_chunk = 512.5 must be a positive whole number"),
    ("prefill_chunk = '512'\npolicy = []\n", r"prefill_chunk = \"512\" must be a positive whole number"),
    ("prefill_chunk = true\npolicy = []\n", r"prefill_chunk = true must be a positive whole number"),
    ("prefil_chunk = 512\npolicy = []\n", r"unknown top-level key 'prefil_chunk' = 512 \(did you mean 'prefill_chunk'"),
])
def test_bad_toml_is_refused_at_parse_time_naming_the_file(tmp_path, text, match):
    path = _toml(tmp_path, text)
    with pytest.raises(ValueError, match=match) as err:
        parse_policy(path)
    assert f"policy file {path!r}" in str(err.value)


@pytest.mark.parametrize("bad,match", [
    ("h2o:heavvy=3", r"unknown knob 'heavvy' = 3 \(did you mean 'heavy'\?\); h2o takes heavy \(int\), recent \(int\), "
                     r"sinks \(int, default 0\), kv_fraction"),
    ("h2o:heavy=1.5,recent=2", r"heavy = 1.5 must be an integer; h2o takes heavy"),
    ("h2o:heavy=true,recent=2", r"heavy = true must be an integer"),
    ("sliding:window=1e3", r"window = 1000.0 must be an integer; sliding takes sinks \(int, default 4\), "
                           r"window \(int, default 1020\), kv_fraction"),
    ("tova:heavy=4,recent=4,sinks=yes", r"sinks = \"yes\" must be an integer"),
    ("aqua:k_ratio=0.5,basis=svd,q_ratio=high", r"q_ratio = \"high\" must be a number; aqua takes k_ratio"),
    ("aqua:exact_recent=1.5", r"exact_recent = 1.5 must be an integer"),
    ("h2o:recent=4", r"h2o needs heavy \(or kv_fraction = a fraction"),
    ("h2o:kv_fraction=0", r"kv_fraction = 0: the fraction of dense KV bytes kept must be in \(0, 1\]"),
    ("sliding:kv_fraction=-0.5", r"kv_fraction = -0.5"),
    ("h2o:kv_fraction=true", r"kv_fraction = true must be a number"),
    ("h2o:kv_fraction=0.25,heavy=8", r"kv_fraction = 0.25 computes heavy and recent from the context; give "
                                     r"kv_fraction or heavy, not both"),
    ("h2o:heavy=-1,recent=3", r"H2O\(heavy=-1\): must be >= 0"),
    ("h2o:kv_fraction=0.25,sinks=-1", r"sinks=-1"),
    ("sliding:window=0", r"window=0"),
    ("aqua:per_layer=random", r"per_layer='random'"),
    ("h2o:heavy=4,recent=4+sliding:window=8", r"at most one token policy, got h2o and sliding"),
    ("h2o:heavy=4,heavy=5,recent=4", r"heavy is given twice"),
])
def test_bad_inline_specs_are_refused_at_parse_time(bad, match):
    """Before any model loads: parse_policy alone refuses them (no build() needed), naming the string."""
    with pytest.raises(ValueError, match=match) as err:
        parse_policy(bad)
    assert repr(bad) in str(err.value)


def test_knob_types_follow_the_policy_dataclasses():
    assert parse_policy("aqua:k_ratio=1").entries == ({"type": "aqua", "k_ratio": 1.0},)
    assert isinstance(parse_policy("aqua:k_ratio=1").entries[0]["k_ratio"], float)
    assert parse_policy("aqua:k_ratio=0.5,artifact=/some/a.safetensors").build()[0].artifact == "/some/a.safetensors"
    assert parse_policy("H2O:heavy=4,recent=4").entries == ({"type": "h2o", "heavy": 4, "recent": 4},)


def test_no_compression_file_and_the_shipped_full_preset(tmp_path):
    assert parse_policy(_toml(tmp_path, 'description = "none"\npolicy = []\n')).is_full
    shipped = Path(__file__).parents[1] / "kvpress_aqua" / "presets" / "full.toml"
    assert parse_policy(str(shipped)).is_full  # policy = []: no compression, said explicitly
    assert "full" in list_presets()
    # a file with only a description is refused, so a typo never runs silently as full
    with pytest.raises(ValueError, match="no \\[\\[policy\\]\\]"):
        parse_policy(_toml(tmp_path, 'description = "none"\n', "copy.toml"))
    again = parse_policy(_toml(tmp_path, parse_policy("full").to_toml(), "full-again.toml"))
    assert again.is_full


# ------------------------------------------------------------------ names and content keys
def test_content_key_is_a_hash_of_the_canonical_entries():
    spec = parse_policy("h2o:heavy=4,recent=4")
    canonical = json.dumps([{"heavy": 4, "recent": 4, "type": "h2o"}], sort_keys=True, separators=(",", ":"))
    assert spec.key == hashlib.sha256(canonical.encode()).hexdigest()[:12]
    assert spec.key == parse_policy("h2o:recent=4,heavy=4").key  # order of knobs
    assert spec.key != parse_policy("h2o:heavy=4,recent=5").key
    assert parse_policy("streaming:window=8").key == parse_policy("sliding:window=8").key  # aliases
    assert parse_policy("aqua:k_ratio=1").key == parse_policy("aqua:k_ratio=1.0").key
    assert parse_policy("h2o-25").key == parse_policy("h2o:kv_fraction=0.25").key
    assert PolicySpec("other name", spec.entries, "words").key == spec.key
    assert parse_policy("full").key == PolicySpec("x", ()).key != spec.key


def test_files_are_named_by_their_path_never_by_a_preset(tmp_path):
    (tmp_path / "pa").mkdir()
    (tmp_path / "pb").mkdir()
    a = _toml(tmp_path, "[[policy]]\ntype = 'h2o'\nheavy = 8\nrecent = 8\n", "pa/p.toml")
    b = _toml(tmp_path, "[[policy]]\ntype = 'h2o'\nheavy = 16\nrecent = 8\n", "pb/p.toml")
    assert (parse_policy(a).name, parse_policy(b).name) == (a, b)
    assert parse_policy(a).source == "file" and parse_policy(a).key != parse_policy(b).key
    lookalike = _toml(tmp_path, "[[policy]]\ntype = 'h2o'\nkv_fraction = 0.5\n", "h2o-25.toml")
    assert parse_policy(lookalike).name == lookalike != "h2o-25"
    assert parse_policy("h2o-25").name == "h2o-25" and parse_policy("h2o-25").source == "preset"


# ------------------------------------------------------------------ the renamed relative knob
@pytest.mark.parametrize("inline", ["h2o:kv=0.25", "tova:heavy=4,kv=0.5", "streaming:kv=0.25+aqua:k_ratio=0.5"])
def test_the_old_kv_knob_is_refused_naming_kv_fraction(inline):
    with pytest.raises(ValueError) as err:
        parse_policy(inline)
    message = str(err.value)
    assert "\n" not in message and repr(inline) in message
    assert "is now kv_fraction" in message and "write kv_fraction = " in message


def test_the_old_kv_knob_in_a_file_is_refused_naming_the_file(tmp_path):
    path = _toml(tmp_path, "[[policy]]\ntype = 'sliding'\nkv = 0.25\n", "old.toml")
    with pytest.raises(ValueError, match=r"sliding kv = 0.25: the knob kv is now kv_fraction .*write kv_fraction = "
                                         r"0.25") as err:
        parse_policy(path)
    assert f"policy file {path!r}" in str(err.value) and "\n" not in str(err.value)


def test_no_shipped_preset_uses_the_old_knob():
    presets = Path(__file__).parents[1] / "kvpress_aqua" / "presets"
    for path in presets.glob("*.toml"):
        assert not any(line.split("=")[0].strip() == "kv" for line in path.read_text().splitlines()), path


@pytest.mark.parametrize("name", ["h2o", "tova", "sliding", "streaming"])
def test_relative_sizes_split_as_the_registry_says(name):
    (policy,) = parse_policy(f"{name}:kv_fraction=0.3").build(context=1000)
    knobs = policy_type(name).split_budget(kv_fraction_budget(0.3, 1000))
    assert policy == policy_type(name).load()(**knobs) and policy.budget == 300


def test_a_planned_prefill_chunk_round_trips_and_is_chosen_when_none_is_given(tmp_path):
    spec = PolicySpec("plan", ({"type": "h2o", "heavy": 60, "recent": 60, "sinks": 4},), "a plan", prefill_chunk=256)
    path = tmp_path / "plan.toml"
    path.write_text(spec.to_toml())
    loaded = parse_policy(str(path))
    assert "prefill_chunk = 256" in path.read_text() and loaded.prefill_chunk == 256
    assert loaded.key == spec.key == PolicySpec("x", spec.entries).key  # the chunk is not part of the content key
    assert "prefill_chunk" not in PolicySpec("x", spec.entries).to_toml()
    full, other = parse_policy("full"), PolicySpec("p2", spec.entries, prefill_chunk=1024)
    assert planned_prefill_chunk([full, loaded, other], 512) == 256  # the smallest keeps every plan in memory
    assert planned_prefill_chunk([full], 512) == 512 and planned_prefill_chunk([], None) is None

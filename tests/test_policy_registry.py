"""The policy registry against the classes it names: one row per policy, checked here against its class.

A new policy is its module, one row in ``kvpress_aqua.policies.registry`` and one row in ``CLASSES``.
"""

import dataclasses
import json
import subprocess
import sys

import pytest

from kvpress_aqua.core.accounting import kv_fraction_budget
from kvpress_aqua.policies import (
    H2O,
    TOVA,
    Aqua,
    BalanceKV,
    ChannelPolicy,
    Retrieval,
    SlidingWindow,
    SnapKV,
    TokenPolicy,
    Uniform,
)
from kvpress_aqua.policies.registry import (
    DEFAULT_SINKS,
    POLICY_TYPES,
    policy_names,
    policy_type,
    token_entry,
    token_policy_names,
)

CLASSES = {"h2o": H2O, "tova": TOVA, "sliding": SlidingWindow, "snapkv": SnapKV, "balancekv": BalanceKV,
           "uniform": Uniform, "retrieval": Retrieval, "aqua": Aqua}
"""Canonical name -> the class its registry row must load."""
BASES = {"token": TokenPolicy, "channel": ChannelPolicy}


def _fields(cls):
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def test_every_policy_has_a_row_and_every_row_a_policy():
    assert set(POLICY_TYPES) == set(CLASSES)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_the_row_matches_its_class(name):
    row = POLICY_TYPES[name]
    cls = row.load()
    assert cls is CLASSES[name] and cls.__name__ == row.class_name
    assert issubclass(cls, BASES[row.kind])
    assert not any(issubclass(cls, base) for kind, base in BASES.items() if kind != row.kind)
    assert row.needs_scores == getattr(cls, "needs_scores", False)
    fields = _fields(cls)
    for knob, value in row.defaults.items():
        assert knob in fields and fields[knob].default == value, (name, knob)
    for alias in row.names:
        assert policy_type(alias) is row and policy_type(alias.upper()) is row


@pytest.mark.parametrize("name", token_policy_names())
@pytest.mark.parametrize("budget", [1, 2, 5, 100, 1001])
def test_a_budget_splits_into_dataclass_fields_that_keep_it(name, budget):
    row = POLICY_TYPES[name]
    knobs = row.split_budget(budget)
    assert set(knobs) <= set(_fields(row.load())) and set(row.split) < set(knobs)
    assert sum(knobs.values()) == budget and knobs["sinks"] == min(DEFAULT_SINKS, budget - 1)
    assert row.load()(**knobs).budget == budget  # the policy's own checks pass


def test_the_split_is_half_and_half_or_a_window():
    assert token_entry("h2o", 100) == {"type": "h2o", "heavy": 48, "recent": 48, "sinks": 4}
    assert token_entry("tova", 101) == {"type": "tova", "heavy": 49, "recent": 48, "sinks": 4}
    assert token_entry("streaming", 100, max_sinks=2) == {"type": "sliding", "sinks": 2, "window": 98}
    assert POLICY_TYPES["h2o"].split_budget(10, sinks=-1) == {"heavy": 6, "recent": 5, "sinks": -1}  # refused later
    with pytest.raises(ValueError, match="channel policy"):
        POLICY_TYPES["aqua"].split_budget(100)
    with pytest.raises(ValueError, match="token policy 'aqua'"):
        token_entry("aqua", 100)


def test_names_and_kinds():
    assert policy_names() == ("aqua", "balancekv", "h2o", "retrieval", "sliding", "snapkv", "streaming", "tova",
                              "uniform")
    assert policy_names("token") == ("balancekv", "h2o", "retrieval", "sliding", "snapkv", "streaming", "tova",
                                     "uniform")
    assert token_policy_names() == ("h2o", "sliding", "snapkv", "tova")  # those with a budget


@pytest.mark.parametrize("name", ["balancekv", "uniform"])
def test_rate_policies_choose_and_take_no_budget(name):
    row = POLICY_TYPES[name]
    policy = row.load()()
    assert row.kind == "token" and not row.split and policy.budget is None and policy.weights_slots
    with pytest.raises(ValueError, match="without a budget"):
        row.split_budget(100)
    with pytest.raises(ValueError, match="unknown policy type 'lru'; use one of aqua, balancekv, h2o"):
        policy_type("lru")


def test_kv_fraction_budget_is_the_byte_formula():
    assert kv_fraction_budget(0.25, 4096) == 1024
    # half the key channels: a token costs 3/4 of a dense one; 68 exact tokens keep 1/4 of a dense one more
    assert kv_fraction_budget(0.25, 4096, 0.5, 68) == (1024 - 17) * 4 // 3
    assert kv_fraction_budget(0.25, 4096, 1.0, 68) == 1024  # nothing dropped, nothing kept back
    assert kv_fraction_budget(0.001, 100) == 2


def test_the_registry_imports_without_torch():
    code = ("import json, sys; from kvpress_aqua.policies import registry as r; "
            "print(json.dumps([sorted(r.POLICY_TYPES), r.token_entry('tova', 9), 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == [sorted(CLASSES), {"type": "tova", "heavy": 3, "recent": 2, "sinks": 4}, False]

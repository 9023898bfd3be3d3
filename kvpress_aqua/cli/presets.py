"""``kvtool presets``: the shipped policy presets, what each keeps, and its inline spec.

A preset is a TOML file in ``kvpress_aqua/presets/`` (:func:`kvpress_aqua.presets.spec.list_presets`);
every ``--policy`` option takes its name. Needs no model and imports no torch beyond what checking
the presets' knobs loads.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import make_console


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``presets`` sub-command."""
    p = sub.add_parser(
        "presets",
        help="list the shipped policy presets and what each keeps",
        description="The presets every --policy option accepts by name: what each keeps (tokens, key channels, "
        "fraction of dense KV bytes), its inline spec and its description.",
    )
    p.add_argument("--json", action="store_true", help="print the presets as one JSON document on stdout")
    p.set_defaults(func=run)


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def inline_spec(entries: tuple[dict[str, Any], ...]) -> str:
    """The inline form of a policy stack (``h2o:kv_fraction=0.25+aqua:k_ratio=0.5``); ``full`` for none."""
    if not entries:
        return "full"
    parts = []
    for entry in entries:
        knobs = ",".join(f"{k}={_value(v)}" for k, v in entry.items() if k != "type")
        parts.append(f"{entry['type']}:{knobs}" if knobs else entry["type"])
    return "+".join(parts)


def keeps(entries: tuple[dict[str, Any], ...]) -> str:
    """What a stack keeps, in words: the fraction of dense KV bytes, the token policy, the key channels."""
    if not entries:
        return "everything (dense)"
    words = []
    for entry in entries:
        knobs = {k: v for k, v in entry.items() if k != "type"}
        if "kv_fraction" in knobs:
            words.insert(0, f"{knobs.pop('kv_fraction'):.0%} of dense KV bytes")
        if "k_ratio" in knobs:
            words.append(f"keys on {knobs.pop('k_ratio'):.0%} of channels")
            continue
        sizes = ", ".join(f"{k} {_value(v)}" for k, v in knobs.items())
        words.append(f"tokens by {entry['type']}" + (f" ({sizes})" if sizes else ""))
    return "; ".join(words)


def run(args: argparse.Namespace) -> int:
    """List the presets; returns the exit code."""
    from rich.table import Table

    from ..presets.spec import list_presets, parse_policy

    specs = [parse_policy(name) for name in list_presets()]
    if args.json:
        print(json.dumps([{"name": s.name, "keeps": keeps(s.entries), "spec": inline_spec(s.entries),
                           "description": s.description, "entries": list(s.entries), "key": s.key}
                          for s in specs], indent=2))
        return 0
    table = Table(title="shipped presets (--policy NAME)", caption="kv bytes = keys + values, metadata excluded")
    table.add_column("preset", no_wrap=True)
    table.add_column("keeps", overflow="fold", ratio=1)
    table.add_column("description", overflow="fold", ratio=2)
    for s in specs:
        table.add_row(s.name, keeps(s.entries), s.description)
    make_console().print(table)
    return 0

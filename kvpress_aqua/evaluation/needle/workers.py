"""Needle cells over several processes: ``kvtool needle --gpus N`` (worker ``i`` on ``cuda:i``, or N CPU processes).

:func:`run_workers` splits the cells into the batches one process would run
(:func:`~kvpress_aqua.evaluation.needle.runner.batches`), hands whole batches to the workers
(:func:`assign`: the longest first, each to the least loaded worker), and passes every row a
worker finishes to ``on_row`` in the parent, which alone writes the results file. Since every
batch runs as it would in one process, on the same kind of device, the rows are the same, cell
for cell (only ``seconds`` differs).

Each worker loads the model on its device (processes are spawned: CUDA cannot be forked), checks
every policy, runs its cells and also appends each row to its own part file
(``<parts>/worker-<i>.jsonl``, :func:`part_path`) before sending it: if the parent dies, the
worker stops at its next row and the rows it finished are in its part file, which the next run
merges (:func:`merge_parts`) before it decides what is left to run.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queues
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ...loading import load_model
from ...presets.spec import PolicySpec
from .results import append_result, read_results
from .runner import RunConfig, batches, check_policies, run_cells
from .tasks import Cell

__all__ = ["Workers", "assign", "merge_parts", "part_path", "run_workers"]

_POLL_SECONDS = 1.0
_EXIT_SECONDS = 5.0


@dataclass(frozen=True)
class Workers:
    """How to start the workers of a run.

    Attributes
    ----------
    devices : tuple of str
        One torch device per worker (``("cuda:0", "cuda:1")``, or ``("cpu", "cpu")``).
    model : str or None
        What each worker loads (:func:`kvpress_aqua.loading.load_model`; ``None``: the default model).
    dtype : str or None
        The weights' dtype (``None``: the loader's default).
    threads : int or None
        Torch CPU threads per worker (``None``: torch's choice).

    """

    devices: tuple[str, ...]
    model: str | None = None
    dtype: str | None = None
    threads: int | None = None


def assign(cells: Sequence[Cell], specs: dict[str, PolicySpec], batch_size: int, workers: int) -> list[list[Cell]]:
    """The cells of each worker: whole batches, the longest first to the least loaded, each list in ``cells`` order.

    A batch's cost is its prompt tokens (length x depths); ties go to the lowest worker, so the
    split is the same on every run.
    """
    order = {c.key(): i for i, c in enumerate(cells)}
    load, shares = [0] * workers, [[] for _ in range(workers)]
    work = batches(cells, specs, batch_size)
    for batch in sorted(work, key=lambda b: -b[0].length * len({c.depth for c in b})):
        i = load.index(min(load))
        load[i] += batch[0].length * len({c.depth for c in batch})
        shares[i] += batch
    return [sorted(s, key=lambda c: order[c.key()]) for s in shares]


def part_path(parts: Path, index: int) -> Path:
    """The part file of worker ``index``."""
    return parts / f"worker-{index}.jsonl"


def merge_parts(parts: Path, on_row: Callable[[dict[str, Any]], None]) -> int:
    """Pass the rows of every part file in ``parts`` to ``on_row`` (a killed run's), then delete the files.

    Returns
    -------
    int
        Rows passed on.

    """
    files = sorted(parts.glob("worker-*.jsonl")) if parts.is_dir() else []
    rows = [row for f in files for row in read_results(f)]
    for row in rows:
        on_row(row)
    for f in files:
        f.unlink()
    return len(rows)


def run_workers(cells: Sequence[Cell], specs: dict[str, PolicySpec], config: RunConfig, workers: Workers, parts: Path,
                on_row: Callable[[dict[str, Any]], None]) -> None:
    """Run ``cells`` on ``len(workers.devices)`` spawned processes; ``on_row`` gets each row as a worker finishes it.

    Parameters
    ----------
    cells : sequence of Cell
        The cells to run (already filtered for resume).
    specs : dict
        Parsed policy per cell policy name.
    config : RunConfig
        Shared settings (its batch size is each worker's).
    workers : Workers
        Devices and loading options.
    parts : Path
        Folder of the workers' part files; they are deleted once their rows are passed on.
    on_row : callable
        Called in this process with each finished row.

    Raises
    ------
    ChildProcessError
        When a worker fails (loading the model, building a policy, running a cell): names the
        worker, its device and the error; the other workers are stopped.
    KeyboardInterrupt
        On Ctrl-C, after the workers are stopped and every row they finished is passed on.

    """
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    parts.mkdir(parents=True, exist_ok=True)
    config = replace(config, _builder=None)  # each worker builds its own prompts with its own tokenizer
    procs = []
    for i, (device, share) in enumerate(zip(workers.devices, assign(cells, specs, config.batch_size,
                                                                        len(workers.devices)), strict=True)):
        if share:
            args = (i, device, workers, share, specs, config, part_path(parts, i), messages, os.getpid())
            procs.append((i, device, context.Process(target=_work, args=args, daemon=True)))
    for _, _, p in procs:
        p.start()
    received: dict[int, int] = {}
    interrupted = False
    try:
        _collect(procs, messages, workers.devices, received, on_row)
    except KeyboardInterrupt:  # raised again below, once its traceback (which holds the queue) is let go
        interrupted = True
    finally:
        for _, _, p in procs:  # stop the workers as Ctrl-C does, so that they exit cleanly; then by force
            if p.is_alive() and not interrupted:
                os.kill(p.pid, signal.SIGINT)
        for _, _, p in procs:
            p.join(_EXIT_SECONDS)
            if p.is_alive():
                p.terminate()
            p.join()
        _drain(messages, received, on_row)
        messages.close()
        messages.join_thread()
        for i, _, _ in procs:
            _forward_unsent(part_path(parts, i), received.get(i, 0), on_row)
    if interrupted:
        raise KeyboardInterrupt


def _collect(procs: list[tuple[int, str, Any]], messages: Any, devices: tuple[str, ...], received: dict[int, int],
             on_row: Callable[[dict[str, Any]], None]) -> None:
    """Pass on the workers' rows until every one is done; raise on a worker's error or silent exit."""
    running = {i for i, _, _ in procs}
    while running:
        try:
            kind, i, payload = messages.get(timeout=_POLL_SECONDS)
        except queues.Empty:
            for j, device, p in procs:
                if j in running and p.exitcode is not None:
                    raise ChildProcessError(f"worker {j} on {device} exited with code {p.exitcode} without a "
                                            "message (out of memory?); rerun to resume the cells left") from None
            continue
        if kind == "row":
            received[i] = received.get(i, 0) + 1
            on_row(payload)
        elif kind == "done":
            running.discard(i)
        else:
            raise ChildProcessError(f"worker {i} on {devices[i]} failed: {payload}; the cells it finished are saved")


def _drain(messages: Any, received: dict[int, int], on_row: Callable[[dict[str, Any]], None]) -> None:
    """Pass on the rows still in the queue after the workers stopped."""
    while True:
        try:
            kind, i, payload = messages.get(timeout=0.1)
        except (queues.Empty, OSError, ValueError):
            return
        if kind == "row":
            received[i] = received.get(i, 0) + 1
            on_row(payload)


def _forward_unsent(part: Path, sent: int, on_row: Callable[[dict[str, Any]], None]) -> None:
    """Pass on the rows of a worker's part file beyond the ``sent`` ones already received, then delete it."""
    for row in read_results(part)[sent:]:
        on_row(row)
    part.unlink(missing_ok=True)


def _work(index: int, device: str, workers: Workers, cells: list[Cell], specs: dict[str, PolicySpec],
          config: RunConfig, part: Path, messages: Any, parent: int) -> None:
    """One worker: load the model on ``device``, check the policies, run ``cells``, send each row."""
    try:
        if workers.threads is not None:
            torch.set_num_threads(workers.threads)
        model, tokenizer = load_model(workers.model, device=device,
                                      **({"dtype": workers.dtype} if workers.dtype is not None else {}))
        check_policies(model, specs, max(c.length for c in cells))

        def send(row: dict[str, Any]) -> None:
            append_result(part, row)
            messages.put(("row", index, row))
            if os.getppid() != parent:  # the parent is gone: stop; the next run merges the part file
                raise SystemExit(1)

        run_cells(model, tokenizer, cells, specs, config, send)
        messages.put(("done", index, None))
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the group; the parent reports
        pass
    except Exception as err:  # sent whole to the parent, which names the worker
        messages.put(("error", index, f"{type(err).__name__}: {err}"))

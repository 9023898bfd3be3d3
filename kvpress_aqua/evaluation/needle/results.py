"""Needle results: the rows of ``results.jsonl`` (the resume store), CSV, and the summary per policy.

A row is identified by the cell (policy, protocol, task, length, depth), the run settings (model,
haystack, seed, prefill chunk) and, for the policy, its content key ``policy_key``
(:attr:`kvpress_aqua.presets.spec.PolicySpec.key`), not its display name: rows of an edited TOML file are
not reused, and a row whose policy was given another name (a path typed differently, an inline
string equal to a preset) is. Rows written before rows carried a ``policy_key`` are read, but have
no key (see :func:`row_key` and ``docs/needle.md``).

Light on purpose (no torch); the runner, :mod:`kvpress_aqua.evaluation.needle.runner`, documents the harness.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .tasks import Cell

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent runs on one folder are not detected there
    fcntl = None

__all__ = [
    "RESULT_FIELDS",
    "SummaryRow",
    "append_result",
    "locked",
    "cell_key",
    "read_results",
    "row_key",
    "summarize",
    "summary_json",
    "write_csv",
    "write_text_atomic",
]

# -------------------------------------------------------------------------------------- results
RESULT_FIELDS = (
    "model", "haystack", "seed", "policy", "policy_key", "protocol", "task", "length", "depth", "kv_bytes",
    "dense_kv_bytes", "kv_fraction", "expected", "answer", "score", "needle_at", "prefill_chunk", "seconds",
    "shared_with", "device", "host_kv_bytes", "hit_rate", "h2d_bytes_per_step",
)
"""Columns of a results row (JSONL keys, CSV header). The last three are a retrieval cache's, per sequence:
its host tier at the end, the share of retrieved rows its working set already held, and the bytes it
copied from the tier per decode step (empty for other caches and in rows written before they existed)."""

_KEY_FIELDS = ("model", "haystack", "seed", "prefill_chunk", "protocol", "task", "length", "depth")


def cell_key(
    cell: Cell, policy_key: str, *, model: str, haystack: str, seed: int, prefill_chunk: int | None
) -> tuple:
    """What identifies a cell's row: the run settings, the policy's content key and the cell.

    Parameters
    ----------
    cell : Cell
        The grid point (its ``policy`` display name is not part of the key).
    policy_key : str
        :attr:`~kvpress_aqua.presets.spec.PolicySpec.key` of the cell's policy.
    model, haystack, seed, prefill_chunk
        The run settings recorded in every row.

    Returns
    -------
    tuple
        Equal to :func:`row_key` of the row the cell produces.

    """
    return (model, haystack, seed, prefill_chunk, policy_key, cell.protocol, cell.task, int(cell.length),
            round(float(cell.depth), 3))


def row_key(row: dict[str, Any], policy_key: str | None = None) -> tuple | None:
    """What identifies a row for resuming (see :func:`cell_key`); ``None`` for a row that cannot be keyed.

    Parameters
    ----------
    row : dict
        A results row.
    policy_key : str, optional
        Content key to assume for a row written before rows carried ``policy_key`` (the row's own
        key wins when it has one).

    Returns
    -------
    tuple or None
        ``None`` when the row has no policy key (and none is given) or lacks a field of the key.

    """
    key = row.get("policy_key") or policy_key
    if not key or any(name not in row for name in _KEY_FIELDS):
        return None
    try:
        return (row["model"], row["haystack"], row["seed"], row["prefill_chunk"], key, row["protocol"], row["task"],
                int(row["length"]), round(float(row["depth"]), 3))
    except (TypeError, ValueError):
        return None


def read_results(path: Path) -> list[dict[str, Any]]:
    """Rows of a results JSONL file (missing file: none); a truncated or garbled line is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def append_result(path: Path, row: dict[str, Any]) -> None:
    """Append one row to a results JSONL file, whole, flushed and synced, so an interrupted run can resume.

    The row goes out in a single write. If the file ends in a torn line (a run killed mid-write),
    a newline is written first so that the new row starts a line of its own and stays readable.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(row) + "\n").encode("utf-8")
    with path.open("a+b") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = b"\n" + data
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` for the block, so that two runs never write the same results at once.

    An advisory ``flock`` on a file that stays behind: the operating system drops the lock when the
    holder exits, however it exits (Ctrl-C, kill -9), so there is no stale lock to clean up.

    Raises
    ------
    OSError
        ``BlockingIOError`` naming the folder when another process holds it.

    """
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("a") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BlockingIOError(f"another kvtool run is writing to {folder}; wait for it to finish (then rerun "
                                      "to resume from its results) or pass another --out") from None
        yield


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file and a rename: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write rows as CSV with :data:`RESULT_FIELDS` columns (atomically)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=RESULT_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


@dataclass(frozen=True)
class SummaryRow:
    """Mean score of one policy under one protocol.

    Attributes
    ----------
    policy, protocol : str
        The group.
    score : float
        Mean exact-match score over all its cells.
    by_length : dict
        Mean score per context length.
    by_task : dict
        Mean score per task.
    kv_fraction : float
        Mean measured fraction of dense KV bytes held.
    kv_bytes : dict
        Mean bytes held per sequence, per context length.
    cells : int
        Cells counted.

    """

    policy: str
    protocol: str
    score: float
    by_length: dict[int, float]
    by_task: dict[str, float]
    kv_fraction: float
    kv_bytes: dict[int, int]
    cells: int


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summarize(rows: Sequence[dict[str, Any]]) -> list[SummaryRow]:
    """Mean scores per (policy, protocol), in first-seen order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["policy"], row["protocol"]), []).append(row)
    out = []
    for (policy, protocol), group in groups.items():
        lengths = sorted({int(r["length"]) for r in group})
        tasks = list(dict.fromkeys(r["task"] for r in group))
        by_length = {n: [r for r in group if int(r["length"]) == n] for n in lengths}
        out.append(SummaryRow(
            policy, protocol, _mean(r["score"] for r in group),
            {n: _mean(r["score"] for r in rs) for n, rs in by_length.items()},
            {t: _mean(r["score"] for r in group if r["task"] == t) for t in tasks},
            _mean(r["kv_fraction"] for r in group),
            {n: round(_mean(r["kv_bytes"] for r in rs)) for n, rs in by_length.items()}, len(group),
        ))
    return out


def summary_json(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`summarize` as JSON-ready dicts."""
    return [asdict(s) for s in summarize(rows)]

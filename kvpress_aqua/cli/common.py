"""What every ``kvtool`` command shares: argument checks, policies, plain consoles, one-line errors, model loading.

Light on purpose: importing this module imports neither torch nor transformers (the parser is built
from the command modules, which import it); the checks that need torch import it when they run.

Every check runs before any model is loaded and raises ``ValueError`` with one line naming the
option, the value given and what to give instead; ``kvtool`` prints it as ``error: ...`` and exits
with code 2.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from ..presets.spec import PolicySpec

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "Interrupted",
    "add_runtime_arguments",
    "apply_threads",
    "check_compile",
    "check_device",
    "check_dtype",
    "check_runtime_arguments",
    "check_threads",
    "load_model_checked",
    "make_console",
    "one_line",
    "parse_specs",
    "progress_bar",
    "where",
]

EXIT_USAGE = 2
"""Exit code for bad input (and for a model that cannot be loaded)."""
EXIT_INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), as shells report it."""


class Interrupted(Exception):  # noqa: N818 - an outcome, not an error
    """A run stopped by Ctrl-C; the message says what was saved and how to resume."""


def one_line(message: object) -> str:
    """``message`` as one physical line: line breaks (and the spaces around them) become one space."""
    return re.sub(r"\s*[\r\n]+\s*", " ", str(message).strip())


def make_console(stderr: bool = False) -> Console:
    """A rich console that prints text as given: no markup, no ``:emoji:`` codes, no highlighting.

    User input (paths, policy names, model names, generated text) goes through it unchanged, in
    tables too; style whole lines with ``console.print(text, style=...)`` instead of markup.
    """
    from rich.console import Console  # rich is imported when a command runs, not for --help

    return Console(stderr=stderr, markup=False, emoji=False, highlight=False)


def progress_bar(console: Console) -> Progress:
    """The commands' progress bar on ``console``: a task's description (as given, no markup), bar, done/total, time.

    Parameters
    ----------
    console : Console
        Where it draws (the command's console: stderr under ``--json``).

    Returns
    -------
    Progress
        Not started: use it as a context manager, ``add_task(description, total=n)`` and ``advance``.

    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console)


def check_threads(threads: int | None, option: str = "--threads") -> int | None:
    """Check a CPU thread count: ``None`` (torch's choice) or a positive integer.

    Raises
    ------
    ValueError
        For zero or a negative count.

    """
    if threads is not None and threads <= 0:
        raise ValueError(f"{option} {threads}: give a positive number of CPU threads, or leave {option} out for "
                         "torch's choice")
    return threads


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU threads (after :func:`check_threads`); ``None`` leaves them."""
    if check_threads(threads) is not None:
        import torch

        torch.set_num_threads(threads)


def check_device(device: str, option: str = "--device") -> str:
    """Check that ``device`` names a torch device this machine has.

    Parameters
    ----------
    device : str
        ``cpu``, ``cuda``, ``cuda:1``, ``mps``...
    option : str
        The option it came from, for the message.

    Returns
    -------
    str
        ``device`` unchanged.

    Raises
    ------
    ValueError
        For a name torch does not know, or a device type (or index) that is not available here.

    """
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{option} {device}: not a torch device; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cpu":
        return device
    backend = getattr(torch, parsed.type, None)
    if parsed.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    available = bool(backend is not None and hasattr(backend, "is_available") and backend.is_available())
    if not available:
        raise ValueError(f"{option} {device}: this machine has no {parsed.type} device available to torch "
                         f"{torch.__version__}; use {option} cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"{option} {device}: only {count} {parsed.type} device(s) here (index 0 to {count - 1})")
    return device


def check_dtype(dtype: str | None, option: str = "--dtype") -> str | None:
    """Check a weight dtype name (``fp32``, ``bf16``, ``fp16``...); ``None`` keeps the default.

    Raises
    ------
    ValueError
        For a name :func:`kvpress_aqua.loading.resolve_dtype` does not know.

    """
    if dtype is None:
        return None
    from ..loading import resolve_dtype

    try:
        resolve_dtype(dtype)
    except ValueError as err:
        raise ValueError(f"{option} {dtype}: {err}") from None
    return dtype


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype`` and ``--threads``: where and how every model command runs its model."""
    p.add_argument("--device", default="cpu", help="torch device of the model: cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--dtype", default=None,
                   help="weight dtype: fp32, bf16 or fp16 (default fp32; bf16 or fp16 halve the memory on a GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def check_compile(compile_: bool, device: str) -> None:
    """Refuse ``--compile`` (CUDA graphs) unless the model runs on CUDA."""
    if compile_ and not str(device).startswith("cuda"):
        raise ValueError(f"--compile replays each decode step as a CUDA graph: add --device cuda (got --device "
                         f"{device}), or leave --compile out")


def check_runtime_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Check the options of :func:`add_runtime_arguments`; returns ``load_model``'s keyword arguments.

    Raises
    ------
    ValueError
        For a bad thread count, dtype name or a device this machine does not have.

    """
    check_threads(args.threads)
    check_dtype(args.dtype)
    check_device(args.device)
    return {"device": args.device, **({"dtype": args.dtype} if args.dtype is not None else {})}


def where(device: str) -> str:
    """What the model runs on, for a status line: ``"2 threads"`` on the CPU, else the device."""
    if device != "cpu":
        return device
    import torch

    threads = torch.get_num_threads()
    return f"{threads} thread{'' if threads == 1 else 's'}"


def load_model_checked(name: str | None, console: Console | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """:func:`kvpress_aqua.loading.load_model` with a spinner; a model that cannot load is one ``ValueError``.

    Parameters
    ----------
    name : str or None
        ``--model`` as given (``None`` for the offline default model).
    console : Console, optional
        Shows a "loading model" spinner while it loads.
    **kwargs
        ``device``, ``dtype``... passed on.

    Returns
    -------
    tuple
        Model and tokenizer.

    Raises
    ------
    ValueError
        Wrapping the ``OSError`` (missing folder or weights, hub offline, unknown id) or
        ``RuntimeError`` (failed conversion, device errors) of the loader, in one line.

    """
    from .. import loading

    try:
        if console is None:
            return loading.load_model(name, **kwargs)
        with console.status("loading model"):
            return loading.load_model(name, **kwargs)
    except (OSError, RuntimeError) as err:
        what = "the default model" if name is None else f"model {name!r}"
        raise ValueError(f"cannot load {what}: {one_line(err)}") from None


def parse_specs(policies: Sequence[str]) -> dict[str, PolicySpec]:
    """Parse policy strings with :func:`~kvpress_aqua.presets.spec.parse_policy`, keyed by display name.

    Specs are told apart by content (:attr:`~kvpress_aqua.presets.spec.PolicySpec.key`): identical ones
    (the same file typed twice, an inline string equal to a preset) are kept once, under the first
    name; different ones always stay apart, a clashing name getting ``@<key>`` appended.
    """
    from ..presets.spec import parse_policy  # the policies import torch: loaded when a command runs

    specs: dict[str, PolicySpec] = {}
    seen: set[str] = set()
    for text in policies:
        spec = parse_policy(text)
        if spec.key in seen:
            continue
        seen.add(spec.key)
        if spec.name in specs:
            spec = replace(spec, name=f"{spec.name}@{spec.key}")
        specs[spec.name] = spec
    return specs

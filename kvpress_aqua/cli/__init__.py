"""The ``kvtool`` command line: one sub-module per sub-command, each with ``register`` and ``run``.

Every sub-command module exposes ``register(subparsers)``, which adds its parser and sets
``func=run``; ``run(args) -> int`` returns the exit code. Bad input raises ``ValueError`` (or
``FileNotFoundError``), which ``main`` prints as one line and turns into exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rich.console import Console

__all__ = ["main"]

_COMMANDS = ("demo", "needle", "ppl", "plan", "calibrate", "generate")


def build_parser() -> argparse.ArgumentParser:
    """Build the ``kvtool`` parser with every sub-command that is installed."""
    parser = argparse.ArgumentParser(
        prog="kvtool",
        description="Compress, plan, calibrate and stress-test the KV cache of Hugging Face decoder models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``kvtool``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``kvtool`` command line: one sub-module per sub-command, each with ``register`` and ``run``.

Every sub-command module exposes ``register(subparsers)``, which adds its parser and sets
``func=run``; ``run(args) -> int`` returns the exit code. Command modules never import each other:
what they share lives in :mod:`~kvpress_aqua.cli.common` (checks, policies, consoles, model loading)
and :mod:`~kvpress_aqua.cli._needle_run` (the needle grid of ``needle`` and ``demo``), which are not
commands. Building the parser imports neither torch nor transformers: the command modules import
their heavy modules when ``run`` is called, so ``kvtool --help`` is quick.

Bad input raises ``ValueError`` (or ``FileNotFoundError``, or another ``OSError``), which ``main``
prints as one plain line, ``error: ...``, and turns into exit code 2. Ctrl-C ends with one line and
exit code 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .common import EXIT_INTERRUPTED, EXIT_USAGE, Interrupted, one_line, print_error

__all__ = ["build_parser", "main"]

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
    """Run ``kvtool``; returns the process exit code (0 ok, 1 nothing fits, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Interrupted as err:
        sys.stderr.write(one_line(err) + "\n")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as err:
        print_error(err)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

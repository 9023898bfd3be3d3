"""The ``kvtool`` command line: one sub-module per sub-command, each with ``register`` and ``run``.

Every sub-command module exposes ``register(subparsers)``, which adds its parser and sets
``func=run``; ``run(args) -> int`` returns the exit code. Command modules never import each other:
what they share lives in :mod:`~kvpress_aqua.cli.common` (checks, policies, consoles, model loading)
and :mod:`~kvpress_aqua.cli._needle_run` (the needle grid of ``needle`` and ``demo``), which are not
commands. Building the parser imports neither torch nor transformers: the command modules import
their heavy modules when ``run`` is called, so ``kvtool --help`` is quick.

Output conventions, the same for every command:

- results go to stdout; progress, notes and warnings to stderr under ``--json`` (stdout then holds
  exactly one JSON document);
- bad input raises ``ValueError`` (or ``FileNotFoundError``, or another ``OSError``), and a malformed
  command line is caught from argparse alike: ``main`` prints it as one plain line, ``error: ...``,
  on stderr (whatever stderr is: no wrapping), plus ``{"error": "..."}`` on stdout under ``--json``,
  and returns exit code 2;
- Ctrl-C ends with one line (what was saved, how to resume) and exit code 130.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import NoReturn

from .._version import __version__
from .common import EXIT_INTERRUPTED, EXIT_USAGE, Interrupted, one_line

__all__ = ["UsageError", "build_parser", "main"]

_COMMANDS = ("demo", "needle", "ppl", "plan", "calibrate", "generate", "presets")


class UsageError(ValueError):
    """A command line argparse cannot read (unknown option, missing argument, bad int...)."""


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line raised as :class:`UsageError`, not usage text and exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}; see {self.prog} --help")


def build_parser() -> argparse.ArgumentParser:
    """Build the ``kvtool`` parser with every sub-command that is installed."""
    parser = _Parser(
        prog="kvtool",
        description="Compress, plan, calibrate and stress-test the KV cache of Hugging Face decoder models.",
    )
    parser.add_argument("--version", action="version", version=f"kvtool {__version__} (kvpress-aqua)")
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


def _fail(message: object, as_json: bool, label: str = "error: ") -> None:
    """One line on stderr (``label`` + message), and ``{"error": message}`` on stdout under ``--json``."""
    sys.stderr.write(f"{label}{one_line(message)}\n")
    sys.stderr.flush()
    if as_json:
        print(json.dumps({"error": one_line(message)}))
        sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kvtool``; returns the process exit code (0 ok, 1 nothing fits, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except Interrupted as err:
        _fail(err, as_json, label="")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _fail("interrupted", as_json, label="")
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as err:
        _fail(err, as_json)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

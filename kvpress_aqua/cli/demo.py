"""``kvtool demo``: the main job in one command, a short needle comparison on the default model.

Full cache vs ``retrieval-25`` (every token kept in a host tier, each decode step attending to the
tokens an 8-channel proxy picks, 25% of dense KV bytes on the accelerator) vs the best eviction
preset at the same bytes, chosen from the full stored run in ``benchmarks/results/needle`` (1,980
cells): the sliding window with attention sinks (mean needle score 0.24 at 25%, against H2O's
0.12 and TOVA's 0.12; the H2O x AQUA presets scored 0.11-0.12). Passkey needles at a few depths of
512 and 1k-token Paul Graham haystacks, both protocols; ends with the rich table and writes the
heatmap PNGs. ``--policy`` swaps in other presets; if one needs AQUA and the model's calibration
is missing, it is made first (what ``kvtool calibrate`` does). Arguments are checked before the
model loads, and Ctrl-C stops it as it stops ``kvtool needle`` (resumable).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..evaluation.needle.tasks import PROTOCOLS, plan_cells
from ._needle_run import add_model_arguments, check_model_arguments, check_policies, execute, report, run_config
from .common import check_runtime_arguments, load_model_checked, make_console, parse_specs, where

if TYPE_CHECKING:
    from rich.console import Console

    from ..presets.spec import PolicySpec

DEMO_POLICIES = ("full", "retrieval-25", "streaming-25")
DEMO_LENGTHS = (512, 1024)
DEMO_DEPTHS = (0.0, 50.0, 100.0)
DEMO_TASK = "passkey"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` sub-command."""
    p = sub.add_parser(
        "demo",
        help="short needle comparison on the default model: full vs retrieval and the best eviction at 25%% of "
        "KV bytes",
        description=f"Passkey needles at depths {', '.join(f'{d:g}%' for d in DEMO_DEPTHS)} of "
        f"{' and '.join(str(n) for n in DEMO_LENGTHS)}-token haystacks, both protocols. Ends with a table and "
        "writes heatmap PNGs; resumable like `kvtool needle`.",
    )
    add_model_arguments(p)
    p.add_argument("--policy", action="append", default=None,
                   help=f"preset name, TOML path or inline spec; repeatable (default: {', '.join(DEMO_POLICIES)})")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--haystack", default="auto", help="essays, noise, auto (default) or a .txt file / folder")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(func=run, seed=0)


def ensure_calibration(model: Any, tokenizer: Any, specs: dict[str, PolicySpec], name: str, console: Console) -> None:
    """Run the AQUA calibration for ``model`` if a policy needs it and no artifact exists yet."""
    if not any(entry["type"] == "aqua" or (entry["type"] == "retrieval" and entry.get("proxy", "lrqk") == "aqua")
               for spec in specs.values() for entry in spec.entries):
        return
    from ..artifacts.aqua import default_artifact_path, find_artifact
    from ..calibration import calibrate
    from ..data.calibration_text import default_calibration_text
    from ..model_info import ModelInfo

    try:
        find_artifact(ModelInfo.from_config(model.config))
        return
    except FileNotFoundError:
        pass
    console.print(f"No AQUA calibration for {name} yet: running `kvtool calibrate` first (once).", style="bold",
                  soft_wrap=True)
    text, source = default_calibration_text()
    start = time.perf_counter()
    artifact = calibrate(model, tokenizer, text, name=name, source=source)
    path = artifact.save(default_artifact_path(ModelInfo.from_config(model.config, name=name)))
    console.print(f"calibrated in {time.perf_counter() - start:.0f} s -> {path}", soft_wrap=True)


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    check_model_arguments(args)
    specs = parse_specs(args.policy or DEMO_POLICIES)
    cells = plan_cells(list(specs), PROTOCOLS, [DEMO_TASK], DEMO_LENGTHS, DEMO_DEPTHS)
    from ..loading import DEFAULT_MODEL  # torch: after the checks, so that typos are reported at once

    console = make_console(stderr=args.json)
    model_name = args.model or DEFAULT_MODEL
    config = run_config(args, model_name, args.haystack, specs.values())
    model, tokenizer = load_model_checked(args.model, console, **check_runtime_arguments(args))
    ensure_calibration(model, tokenizer, specs, model_name, console)
    check_policies(model, specs, max(DEMO_LENGTHS))
    console.print(f"needle demo: {len(cells)} cells ({', '.join(specs)}; passkey; "
                  f"{', '.join(str(n) for n in DEMO_LENGTHS)} tokens; depths "
                  f"{', '.join(f'{d:g}%' for d in DEMO_DEPTHS)}; both protocols) on {model_name}, "
                  f"{where(args.device)}", soft_wrap=True)
    start = time.perf_counter()
    rows = execute(model, tokenizer, cells, specs, config, args.out, console)
    short = model_name.rstrip("/").rsplit("/", 1)[-1]  # the table is 70 columns wide: a hub id's name part
    title = f"needle demo: {short}, {config.haystack.name} haystack, {time.perf_counter() - start:.0f} s"
    report(rows, args, model_name, title, console)
    return 0

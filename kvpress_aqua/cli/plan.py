"""``kvtool plan``: what fits in a memory budget, and what it costs in quality.

Exit codes: 0 when a plan fits, 1 when nothing fits (the message says what would), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..planner.search import DEFAULT_MIN_TOKENS, Candidate, Plan, plan
from ..policies.registry import token_policy_names
from ..util.sizes import format_bytes

_FRONTIER_ROWS = 10


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``plan`` sub-command."""
    p = sub.add_parser(
        "plan",
        help="pick k_ratio and token budget that fit a memory budget",
        description="For each AQUA k_ratio, the largest token budget that fits a memory budget, with its estimated "
        "quality, the memory-quality frontier and a recommendation. Reads the model's config only.",
    )
    p.add_argument("--budget", required=True, help="memory budget: 8GB (10^9 bytes), 24GiB (2^30), 512MiB, bytes")
    p.add_argument("--model", required=True, help="hub id, short name (smollm2-135m), model folder or config.json")
    p.add_argument("--context", default=None,
                   help="prompt tokens, e.g. 8192 or 128k (k = 1024); default: the model's max_position_embeddings")
    p.add_argument("--batch", default="1", help="sequences decoded together (default 1)")
    p.add_argument("--new-tokens", default="0", help="tokens generated per sequence (default 0)")
    p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 or fp8 (default: the config's dtype)")
    p.add_argument("--prefill-chunk", default=None, help="prefill chunk in tokens (default: the whole prompt at once)")
    p.add_argument("--overhead", default=None, help="runtime overhead, e.g. 1GiB or 0 (default 512MiB)")
    p.add_argument("--token-policy", default="h2o",
                   help=f"eviction policy of the plans: {', '.join(token_policy_names())} (default h2o)")
    p.add_argument("--min-tokens", default=str(DEFAULT_MIN_TOKENS),
                   help=f"plans keeping fewer tokens count as not fitting (default {DEFAULT_MIN_TOKENS})")
    p.add_argument("--artifact", default=None, help="AQUA artifact to read the quality model from")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--explain", action="store_true", help="print the memory formula with the numbers substituted")
    p.add_argument("--plot", type=Path, default=None, metavar="PATH", help="save the memory-quality frontier plot")
    p.add_argument("--emit-preset", type=Path, default=None, metavar="PATH",
                   help="write the recommendation as a policy preset TOML")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Plan, print, and write the optional plot and preset; returns the exit code."""
    result = plan(
        budget=args.budget, model=args.model, context=args.context, batch=args.batch, new_tokens=args.new_tokens,
        dtype=args.dtype, prefill_chunk=args.prefill_chunk, overhead=args.overhead, token_policy=args.token_policy,
        min_tokens=args.min_tokens, artifact=args.artifact,
    )
    if args.plot is not None:
        plot_frontier(result, args.plot)
    if args.emit_preset is not None and result.fits:
        args.emit_preset.write_text(result.to_toml())
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print(result, args)
    return 0 if result.fits else 1


def _print(result: Plan, args: argparse.Namespace) -> None:
    console = Console(highlight=False, markup=False)
    mm, info = result.memory_model, result.model.info
    sliding = sum(w is not None for w in mm.windows)
    console.print(f"budget {args.budget} = {result.budget:,} bytes ({format_bytes(result.budget)}, "
                  f"{format_bytes(result.budget, binary=False)})")
    layers = f"{info.num_layers} layers" + (f" ({sliding} sliding, window {info.sliding_window})" if sliding else "")
    console.print(f"model {info.name} ({result.model.source}): {layers}, {info.num_heads} heads, "
                  f"{info.num_kv_heads} KV heads, head_dim {info.head_dim}, {result.model.parameters:,} parameters")
    chunk = f"prefill chunk {mm.prefill_chunk:,}" if mm.prefill_chunk else "prefill in one chunk"
    console.print(f"{mm.context:,}-token context, batch {mm.batch}, {mm.new_tokens} new tokens, {mm.dtype}, {chunk}, "
                  f"overhead {format_bytes(mm.overhead)}, token policy {mm.token_policy}")
    console.print(f"quality source ({result.quality_model.kind}): {result.quality_source}")
    console.print(_candidate_table(result))
    if result.frontier:
        console.print(_frontier_table(result))
    console.print(result.message, style="bold green" if result.fits else "bold red")
    for note in result.notes:
        console.print(f"note: {note}")
    if args.explain:
        console.print(result.explain())
    if args.plot is not None:
        console.print(f"plot written to {args.plot}")
    if args.emit_preset is not None:
        console.print(f"preset written to {args.emit_preset}" if result.fits else "no preset written: nothing fits")


def _row(c: Candidate, seen: int) -> list[str]:
    tokens = f"all {seen:,}" if c.token_budget is None else f"{c.token_budget:,}"
    return [f"{c.k_ratio:g}", str(c.key_dim), tokens, format_bytes(c.memory.cache_bytes),
            format_bytes(c.memory.total), f"{c.quality:.3f}"]


def _candidate_table(result: Plan) -> Table:
    table = Table(title="largest token budget that fits, per k_ratio")
    for col in ("k_ratio", "key ch.", "tokens held", "KV bytes", "total", "est. quality"):
        table.add_column(col, justify="right")
    table.add_column("verdict", no_wrap=True)
    styles = {"recommended": "bold green", "does not fit": "red"}
    for c in result.candidates:
        table.add_row(*_row(c, result.memory_model.seen), c.verdict, style=styles.get(c.verdict))
    table.caption = ("tokens held: per full-attention layer, KV head and sequence (sliding layers keep at most "
                     "their window); KV bytes: keys, values, slot metadata and AQUA projections at the end "
                     "(= cache.nbytes()); total: predicted peak")
    return table


def _frontier_table(result: Plan) -> Table:
    points = result.frontier
    if len(points) > _FRONTIER_ROWS:
        step = (len(points) - 1) / (_FRONTIER_ROWS - 1)
        points = tuple(points[round(i * step)] for i in range(_FRONTIER_ROWS))
    table = Table(title=f"memory-quality frontier ({len(result.frontier)} points, {len(points)} shown)")
    for col in ("k_ratio", "key ch.", "tokens held", "KV bytes", "total", "est. quality"):
        table.add_column(col, justify="right")
    for c in points:
        table.add_row(*_row(c, result.memory_model.seen))
    return table


def plot_frontier(result: Plan, path: Path) -> None:
    """Save quality vs predicted peak memory for every k_ratio, the frontier and the budget to ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise ValueError("--plot needs matplotlib: pip install 'kvpress-aqua[plot]'") from None
    gib = 2**30
    fig, ax = plt.subplots(figsize=(8, 5))
    for k_ratio, row in result.curves().items():
        ax.plot([t / gib for t, _ in row], [q for _, q in row], lw=1, alpha=0.7, label=f"k_ratio {k_ratio:g}")
    if result.frontier:
        ax.plot([c.memory.total / gib for c in result.frontier], [c.quality for c in result.frontier], "k-", lw=2.5,
                drawstyle="steps-post", label="frontier (fits)")
    if result.recommendation is not None:
        r = result.recommendation
        ax.plot([r.memory.total / gib], [r.quality], "r*", ms=14, label="recommended")
    ax.axvline(result.budget / gib, color="r", ls="--", lw=1, label=f"budget {format_bytes(result.budget)}")
    mm = result.memory_model
    ax.set_xlabel("predicted peak memory (GiB)")
    ax.set_ylabel("estimated quality (1 = dense)")
    ax.set_title(f"{result.model.info.name}: {mm.context:,} context, batch {mm.batch}, {mm.dtype}", fontsize=10)
    ax.text(0.01, 0.01, f"quality: {result.quality_source}", transform=ax.transAxes, fontsize=6, va="bottom", wrap=True)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


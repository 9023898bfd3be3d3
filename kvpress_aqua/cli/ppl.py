"""``kvtool ppl``: perplexity of a text with each policy's compressed cache in the loop, and its change vs full.

Arguments are checked before the model loads; torch and the runner are imported when it runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..util.sizes import parse_tokens
from ._tables import Column, bytes_column, fit_tables
from .common import (
    add_runtime_arguments,
    apply_threads,
    check_runtime_arguments,
    load_model_checked,
    make_console,
    parse_specs,
    progress_bar,
)

DEFAULT_POLICIES = ("h2o-50", "h2o-aqua-2x", "aqua-k50")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``ppl`` sub-command."""
    p = sub.add_parser(
        "ppl",
        help="perplexity through the compressed cache, per policy, with the change vs the full cache",
        description="Feed a text through each policy's compressed cache in chunks and score every next token from "
        "logits computed while the cache is compressed. The full cache is always run as the reference.",
    )
    p.add_argument("--model", default=None, help="hub id or local path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--policy", action="append", default=None,
                   help=f"preset name, TOML path or inline spec; repeatable (default: {', '.join(DEFAULT_POLICIES)})")
    p.add_argument("--text", type=Path, default=None, metavar="FILE",
                   help="text file (default: the Paul Graham essays of the needle haystack, held out from AQUA "
                   "calibration)")
    p.add_argument("--tokens", default="4k", help="tokens of the text scored, e.g. 2048 or 8k (default 4k)")
    p.add_argument("--chunk", type=int, default=32, help="tokens per forward; 1 = token-by-token (default 32)")
    add_runtime_arguments(p)
    p.add_argument("--json", action="store_true", help="print results as one JSON document on stdout (logs on stderr)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Compute and print perplexities; returns the exit code."""
    load_kwargs = check_runtime_arguments(args)
    if args.chunk <= 0:
        raise ValueError(f"--chunk {args.chunk}: give a positive number of tokens per forward (1 = token by token)")
    tokens = parse_tokens(args.tokens)
    if tokens < 2:
        raise ValueError(f"--tokens {args.tokens}: give at least 2 tokens")
    if args.text is not None and not args.text.is_file():
        raise FileNotFoundError(f"text file {args.text} does not exist")
    specs = parse_specs(["full", *(args.policy or DEFAULT_POLICIES)])
    # torch and the runner: after the checks, so that typos are reported at once
    import torch

    from ..data.haystack import load_haystack
    from ..evaluation.perplexity import PerplexityResult, perplexity
    from ..loading import DEFAULT_MODEL

    apply_threads(args.threads)
    if args.text is None:
        source, text = "Paul Graham essays", load_haystack("essays").text
    else:
        source, text = str(args.text), args.text.read_text(encoding="utf-8")
    console = make_console(stderr=args.json)
    model, tokenizer = load_model_checked(args.model, console, **load_kwargs)
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=True)[:tokens])
    if ids.numel() < tokens:
        console.print(f"note: the text has only {ids.numel()} tokens; scoring those", style="yellow", soft_wrap=True)
    context = ids.numel()
    results: dict[str, PerplexityResult] = {}
    with progress_bar(console) as progress:
        for name, spec in specs.items():
            bar = progress.add_task(name, total=context - 1)
            results[name] = perplexity(model, ids, spec.build(context=context), chunk=args.chunk,
                                       on_chunk=lambda k, bar=bar: progress.advance(bar, k))
    reference = results["full"].ppl
    rows = [{
        "policy": name, "tokens": r.tokens, "ppl": round(r.ppl, 4),
        "delta_pct": round(100 * (r.ppl / reference - 1), 2), "nll": round(r.nll, 5), "kv_bytes": r.kv_bytes,
        "dense_kv_bytes": r.dense_kv_bytes,
        "kv_fraction": round(r.kv_bytes / r.dense_kv_bytes, 4), "seconds": round(r.seconds, 1),
    } for name, r in results.items()]
    model_name = args.model or DEFAULT_MODEL
    if args.json:
        print(json.dumps({"model": model_name, "text": source, "chunk": args.chunk, "results": rows}, indent=2))
        return 0
    unit, held = bytes_column([r["kv_bytes"] for r in rows])
    values = [Column("PPL"), Column("Δ%"), Column(unit), Column("KV%"), Column("s")]
    cells = [[r["policy"], f"{r['ppl']:.3f}", f"{r['delta_pct']:+.2f}", kv, f"{100 * r['kv_fraction']:.1f}",
              f"{r['seconds']:.1f}"] for r, kv in zip(rows, held, strict=True)]
    caption = ("every token is predicted through the compressed cache; Δ% = change of PPL vs full; "
               f"{unit} = KV bytes held after the last chunk, KV% = the same in % of full; s = seconds")
    for table in fit_tables(f"perplexity of {context} tokens of {source}, {model_name}, chunks of {args.chunk}",
                            caption, [Column("policy", fold=True, justify="left")], values, cells, console.width):
        console.print(table)
    return 0

"""``kvtool generate``: generate with each policy on the same prompt and compare text and bytes held.

Each policy answers greedily through its compressed cache
(:func:`kvpress_aqua.evaluation.generation.greedy_generate`, the needle harness's decode loop); the
bytes shown are those held after the first decode step. ``--compile`` decodes through a static
cache and one compiled step (CUDA graphs). Arguments are checked before the model
loads; torch and the cache are imported when it runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ._tables import Column, bytes_column, fit_tables
from .common import (
    add_runtime_arguments,
    apply_threads,
    check_compile,
    check_runtime_arguments,
    load_model_checked,
    make_console,
    parse_specs,
)

DEFAULT_POLICIES = ("full", "streaming-25", "h2o-25")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``generate`` sub-command."""
    p = sub.add_parser(
        "generate",
        help="generate with several policies on one prompt and compare their output and KV bytes",
        description="Answer one chat prompt greedily with each policy's compressed cache and compare the text and "
        "the KV bytes held after the first decode step (and what a full cache would hold). Without --prompt, a "
        "built-in 3k-token log whose question needs its first sentence.",
    )
    p.add_argument("--model", default=None, help="hub id or local path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--policy", action="append", default=None,
                   help=f"preset name, TOML path or inline spec; repeatable (default: {', '.join(DEFAULT_POLICIES)})")
    p.add_argument("--prompt", default=None, help="user message (default: a built-in long prompt)")
    p.add_argument("--prompt-file", type=Path, default=None, metavar="FILE",
                   help="read the user message from a file (default: --prompt, else the built-in prompt)")
    p.add_argument("--max-new-tokens", type=int, default=48, metavar="N",
                   help="tokens generated per policy at most (default 48)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="feed the prompt in chunks of this many tokens (default: the whole prompt in one forward)")
    p.add_argument("--compile", action="store_true",
                   help="decode through a static cache and a compiled step (torch.compile, CUDA graphs; needs "
                        "--device cuda); full caches and block summaries decode as without it")
    add_runtime_arguments(p)
    p.add_argument("--json", action="store_true", help="print results as one JSON document on stdout (logs on stderr)")
    p.set_defaults(func=run)


def default_prompt() -> str:
    """A long, self-contained prompt whose answer needs its beginning."""
    log = " ".join(
        f"Day {i}: the keeper logged the weather, trimmed the wick and counted {i * 7 % 13} ships."
        for i in range(1, 120)
    )
    return f"The keeper's cat is called Biscuit. {log}\n\nWhat is the keeper's cat called, and what does he do daily?"


def run(args: argparse.Namespace) -> int:
    """Run the comparison; returns the exit code."""
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: give a positive number of tokens")
    if args.prefill_chunk is not None and args.prefill_chunk <= 0:
        raise ValueError(f"--prefill-chunk {args.prefill_chunk}: give a positive token count, or leave it out")
    load_kwargs = check_runtime_arguments(args)
    check_compile(args.compile, args.device)
    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError("give --prompt or --prompt-file, not both")
    if args.prompt_file is not None and not args.prompt_file.is_file():
        raise FileNotFoundError(f"prompt file {args.prompt_file} does not exist")
    specs = list(parse_specs(args.policy or DEFAULT_POLICIES).values())
    # torch and the cache: after the checks, so that typos are reported at once
    from ..core.cache import CompressedCache
    from ..evaluation.generation import eos_ids, greedy_generate
    from ..evaluation.static_decode import compiled_step

    prompt = args.prompt_file.read_text(encoding="utf-8") if args.prompt_file else (args.prompt or default_prompt())
    console = make_console(stderr=args.json)
    apply_threads(args.threads)
    model, tokenizer = load_model_checked(args.model, console, **load_kwargs)
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"].to(next(model.parameters()).device)
    context, eos = ids.shape[1], eos_ids(model, tokenizer)
    step = compiled_step() if args.compile else None
    rows = []
    for spec in specs:
        cache = CompressedCache(model, *spec.build(context=context),
                                prefill_chunk=args.prefill_chunk or spec.prefill_chunk)
        start = time.perf_counter()
        try:
            out = greedy_generate(model, cache, ids, args.max_new_tokens, eos, step=step)
            seconds = time.perf_counter() - start
            if not args.json:
                console.print(cache.memory_report() if len(specs) == 1 else str(cache.memory_report()),
                              soft_wrap=len(specs) > 1)
        finally:
            cache.detach()
        text = tokenizer.decode(out.tokens[0], skip_special_tokens=True).strip()
        rows.append({"policy": spec.name, "prompt_tokens": context, "kv_bytes": out.kv_bytes,
                     "dense_kv_bytes": out.dense_kv_bytes, "seconds": round(seconds, 2),
                     "decode": "compiled" if out.static else "eager", "text": text})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    unit, held = bytes_column([r["kv_bytes"] for r in rows])
    values = [Column(unit), Column("KV%"), Column("s"), Column("output", fold=True, justify="left")]
    cells = [[r["policy"], kv, f"{100 * r['kv_bytes'] / r['dense_kv_bytes']:.1f}", f"{r['seconds']:.1f}", r["text"]]
             for r, kv in zip(rows, held, strict=True)]
    caption = f"{unit} = KV bytes held after the first decode step, KV% = the same in % of a full cache; s = seconds"
    if args.compile:
        eager = [r["policy"] for r in rows if r["decode"] == "eager"]
        caption += f" (compilation included); decoded compiled, except {', '.join(eager) or 'none'}"
    for table in fit_tables(f"{context}-token prompt, greedy, {args.max_new_tokens} new tokens", caption,
                            [Column("policy", fold=True, justify="left")], values, cells, console.width):
        console.print(table)
    return 0

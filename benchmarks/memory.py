"""Held KV bytes, peak RSS and time for a 4k-token prompt on SmolLM2: full vs SlidingWindow, H2O, retrieval at 25%.

Each configuration runs in its own process (peak RSS is a per-process high-water mark): load the
model, run an 8-token forward without a cache (the weights are memory-mapped: it pages them in),
note RSS, feed the prompt, decode a few tokens, then report the cache's measured bytes, the peak
RSS above the post-load baseline and the wall time. Two ways of feeding the prompt:

- ``prefill``: ``cache.prefill(ids)`` (chunks of 512 for the ``*-chunked`` and compressed rows, one
  forward for ``full``), then a greedy decode loop;
- ``generate``: the README's snippet, ``model.generate(ids, cache=cache)``, with no chunking at all
  (``generate-*`` rows, against ``DynamicCache`` in ``generate-full``) or with generate's own
  ``prefill_chunk_size=512`` (``generate-chunked-*``).

``--only`` also takes any shipped preset's name (``kvtool presets``): its cache fed by ``prefill``
in chunks of 512, like the compressed rows above.

The prompt is random token ids from a fixed seed: bytes do not depend on text.

Run: python benchmarks/memory.py [--tokens 4096] [--out benchmarks/results/memory.json]
     python benchmarks/memory.py --only full-chunked snapkv-25 balancekv-25 --out FILE
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

from rss import reset_peak_rss, status_bytes

from kvpress_aqua.presets.spec import list_presets

CONFIGS = {
    "full": "full",
    "full-chunked": "full",
    "sliding-25": "streaming-25",
    "h2o-25": "h2o-25",
    "retrieval-25": "retrieval-25",
    "generate-full": "full",
    "generate-sliding-25": "streaming-25",
    "generate-h2o-25": "h2o-25",
    "generate-chunked-full": "full",
    "generate-chunked-sliding-25": "streaming-25",
    "generate-chunked-h2o-25": "h2o-25",
}
CHUNK = 512
CHOICES = [*CONFIGS, *(name for name in list_presets() if name not in CONFIGS and name != "full")]
"""``--only``: the configurations above, then every other shipped preset (prefilled in chunks)."""


def run_one(name: str, tokens: int, new_tokens: int) -> dict:
    import torch

    from kvpress_aqua import CompressedCache
    from kvpress_aqua.loading import load_model
    from kvpress_aqua.presets.spec import parse_policy
    from kvpress_aqua.util.compat import cache_kwargs

    model, _ = load_model()
    ids = torch.randint(100, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    spec = parse_policy(CONFIGS.get(name, name))
    generate = name.startswith("generate-")
    chunk = None if name == "full" or generate else CHUNK
    generate_chunk = {"prefill_chunk_size": CHUNK} if name.startswith("generate-chunked-") else {}
    cache = CompressedCache(model, *spec.build(context=tokens), prefill_chunk=chunk)
    with torch.inference_mode():  # page the memory-mapped weights in before the baseline
        model(ids[:, :8])
    gc.collect()
    baseline = status_bytes("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    with torch.inference_mode():
        if generate:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens + 1,
                           min_new_tokens=new_tokens + 1, do_sample=False, **generate_chunk,
                           **cache_kwargs(model, cache))
            after_prefill = None
        else:
            logits = cache.prefill(ids)
            after_prefill = cache.nbytes()
            for _ in range(new_tokens):
                nxt = logits.argmax(-1, keepdim=True)
                logits = model(nxt, **cache_kwargs(model, cache)).logits[:, -1]
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    layer = cache.layers[0]
    return {
        "config": name,
        "policy": spec.name,
        "policies": [repr(p) for p in spec.build(context=tokens)],
        "prompt_tokens": tokens,
        "new_tokens": new_tokens,
        "prefill_chunk": chunk,
        "feed": ("generate, prefill_chunk_size=512" if generate_chunk else "generate") if generate else "prefill",
        "seconds": round(seconds, 2),
        "kv_bytes": cache.nbytes(),
        "kv_bytes_after_prefill": after_prefill,
        "dense_kv_bytes": cache.dense_nbytes(),
        "fraction_of_dense": cache.nbytes() / cache.dense_nbytes(),
        "slots_per_layer": int(layer.keys.shape[-2]),
        "peak_rss_above_baseline": peak - baseline,
        "baseline_rss": baseline,
        "peak_rss": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--one", choices=CHOICES, help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=CHOICES, default=list(CONFIGS),
                        help="configurations to run (default: the named configurations, no extra presets)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.tokens, args.new_tokens)))
        return
    results = []
    for name in args.only:
        cmd = [sys.executable, __file__, "--one", name, "--tokens", str(args.tokens),
               "--new-tokens", str(args.new_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{name:>19}: KV {r['kv_bytes'] / 2**20:8.2f} MiB ({r['fraction_of_dense']:.1%} of dense), "
              f"peak RSS +{r['peak_rss_above_baseline'] / 2**20:8.1f} MiB, {r['seconds']:6.1f} s", file=sys.stderr)
    report = {"benchmark": "memory", "model": "SmolLM2-135M-Instruct (fp32, CPU)", "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Prefill time of each token policy, side by side in one run, as a ratio to H2O's.

Each policy's cache prefills the same random prompt of ``--context`` tokens in chunks of ``--chunk``
(``CompressedCache.prefill``); the policies run in turn, ``--rounds`` times, and the median time of
each is reported with its ratio to ``h2o-25``. BalanceKV's walk (``block / 2`` sequential steps per
halving, per reduced group of blocks and layer) is the cost this measures.

- CPU: SmolLM2-135M (the default model), float32.
- GPU (``--random-8b``): the Llama-3.1-8B shape with random bf16 weights, ``--layers`` of its 32
  layers (timing per layer does not depend on the weights).

Run: python benchmarks/prefill_cost.py [--context 4096] [--chunk 512] [--rounds 3] [--random-8b --layers 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvpress_aqua import CompressedCache
from kvpress_aqua.loading import load_model
from kvpress_aqua.presets.spec import parse_policy

POLICIES = ("full", "h2o-25", "tova-25", "snapkv-25", "streaming-25", "uniform-25", "balancekv-25")


def random_8b(layers: int, device: str) -> LlamaForCausalLM:
    """Llama-3.1-8B's shape, ``layers`` layers, random bf16 weights."""
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--random-8b", action="store_true", help="random-weight Llama-3.1-8B shape (for the GPU)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random 8B shape")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prefill_cost-cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.random_8b:
        model, shape = random_8b(args.layers, args.device), f"llama-3.1-8b shape, {args.layers} layers, random bf16"
    else:
        model, _ = load_model(None, device=args.device)
        shape = "SmolLM2-135M-Instruct, float32"
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    times: dict[str, list[float]] = {name: [] for name in POLICIES}
    for _ in range(args.rounds):
        for name in POLICIES:
            cache = CompressedCache(model, *parse_policy(name).build(context=args.context), prefill_chunk=args.chunk)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            cache.prefill(ids)
            cache.finalize()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            cache.detach()
            print(f"{name}: {times[name][-1]:.2f} s", file=sys.stderr)
    median = {name: statistics.median(t) for name, t in times.items()}
    report = dict(
        meta=dict(shape=shape, device=args.device, context=args.context, chunk=args.chunk, rounds=args.rounds,
                  torch=torch.__version__, command=" ".join(sys.argv)),
        median_seconds={name: round(t, 3) for name, t in median.items()},
        relative_to_h2o={name: round(t / median["h2o-25"], 3) for name, t in median.items()},
        seconds=times,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("meta", "median_seconds", "relative_to_h2o")}, indent=1))


if __name__ == "__main__":
    main()

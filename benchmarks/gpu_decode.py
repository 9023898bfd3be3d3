"""GPU decode-step latency and peak memory: DynamicCache vs compressed caches, Llama-3.1-8B shape.

Random bf16 weights with the Llama-3.1-8B config (the weights do not change the timing or the
bytes), eager `transformers` decoding. For each cache: prefill a random prompt in chunks, then time
decode steps with CUDA events; report ms/step, the cache's measured bytes, and
`torch.cuda.max_memory_allocated` over the run.

Run (on a GPU): python benchmarks/gpu_decode.py [--context 8192] [--batch 1 4] [--layers 32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvpress_aqua import CompressedCache
from kvpress_aqua.policies import H2O, SlidingWindow
from kvpress_aqua.policies.aqua import Aqua

LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=128, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                   tie_word_embeddings=False)


def caches(context: int) -> dict:
    quarter = context // 4
    return {
        "dynamic": (),
        "sliding-25": (SlidingWindow(sinks=4, window=quarter - 4),),
        "h2o-25": (H2O(heavy=quarter // 2, recent=quarter - quarter // 2 - 4, sinks=4),),
        "h2o-aqua-4x": (H2O(heavy=context // 6, recent=context // 3 - context // 6 - 4, sinks=4),
                        Aqua(k_ratio=0.5, basis="identity")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_decode.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=args.layers, **LLAMA_31_8B)).to(torch.bfloat16).eval()
    model.config._attn_implementation = "sdpa"
    rows = []
    for batch in args.batch:
        ids = torch.randint(0, 128000, (batch, args.context), device="cuda")
        for name, policies in caches(args.context).items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            cache = CompressedCache(model, *policies, prefill_chunk=args.chunk)
            with torch.inference_mode():
                logits = cache.prefill(ids)
                nxt = logits.argmax(-1, keepdim=True)
                for _ in range(3):
                    nxt = model(nxt, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.steps):
                    nxt = model(nxt, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
                end.record()
                torch.cuda.synchronize()
            row = {"cache": name, "batch": batch, "context": args.context, "layers": args.layers,
                   "ms_per_step": start.elapsed_time(end) / args.steps, "kv_bytes": cache.nbytes(),
                   "dense_kv_bytes": cache.dense_nbytes(),
                   "peak_allocated_above_weights": torch.cuda.max_memory_allocated() - base,
                   "weights_bytes": base}
            rows.append(row)
            print(json.dumps(row), flush=True)
            cache.detach()
            del cache
    dynamic = {r["batch"]: r["ms_per_step"] for r in rows if r["cache"] == "dynamic"}
    for r in rows:
        r["step_time_vs_dynamic"] = r["ms_per_step"] / dynamic[r["batch"]]
    report = {"benchmark": "gpu_decode", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

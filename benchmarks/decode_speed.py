"""Decode-step latency and memory: DynamicCache vs compressed caches, side by side in one run.

Random weights with a real model's config (weights change neither timing nor bytes), eager
`transformers` decoding. For each cache: prefill a random prompt in chunks, then time decode steps
(CUDA events on a GPU, wall clock on CPU); report ms/step, its ratio to DynamicCache in the same
run, the cache's measured bytes and, on a GPU, `torch.cuda.max_memory_allocated` over the run.

Run: python benchmarks/decode_speed.py --device cuda --shape llama-3.1-8b [--context 8192] [--batch 1 4]
     python benchmarks/decode_speed.py --device cpu --shape smollm2-135m --context 2048 --batch 1
AQUA runs with `basis="identity"` here (no calibration for random weights): same bytes and cost.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvpress_aqua import CompressedCache
from kvpress_aqua.planner.search import MemoryModel, resolve_model
from kvpress_aqua.policies import H2O, SlidingWindow
from kvpress_aqua.policies.aqua import Aqua

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                         tie_word_embeddings=False, num_hidden_layers=32),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True, num_hidden_layers=30),
}


class Timer:
    """Elapsed milliseconds of a block: CUDA events on a GPU, wall clock on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __enter__(self) -> Timer:
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def predict(model: LlamaForCausalLM, policies: tuple, batch: int, context: int, seen_after: int, chunk: int,
            dtype: str) -> dict:
    """The planner's prediction for this run: KV bytes at the end and peak bytes (no runtime overhead)."""
    token = next((p for p in policies if not isinstance(p, Aqua)), None)
    aqua = next((p for p in policies if isinstance(p, Aqua)), None)
    shape = resolve_model(model.config)
    memory = MemoryModel(shape=shape, batch=batch, context=context, new_tokens=seen_after - context + 1, dtype=dtype,
                         prefill_chunk=chunk, overhead=0,
                         token_policy="sliding" if isinstance(token, SlidingWindow) else "h2o",
                         exact_tokens=aqua.exact_sinks + aqua.exact_recent if aqua else 0)
    d = shape.info.head_dim
    breakdown = memory.evaluate(round(aqua.k_ratio * d) if aqua else d, token.budget if token else None)
    return {"predicted_kv_bytes": breakdown.cache_bytes, "predicted_peak_bytes": breakdown.total}


def caches(context: int) -> dict:
    quarter = context // 4
    return {
        "dynamic": (),
        "sliding-25": (SlidingWindow(sinks=4, window=quarter - 4),),
        "h2o-25": (H2O(heavy=quarter // 2, recent=quarter - quarter // 2 - 4, sinks=4),),
        "h2o-aqua-4x": (H2O(heavy=context // 6, recent=context // 3 - context // 6 - 4, sinks=4),
                        Aqua(k_ratio=0.5, basis="identity")),
        "h2o-aqua-4x no exact": (H2O(heavy=context // 6, recent=context // 3 - context // 6 - 4, sinks=4),
                                 Aqua(k_ratio=0.5, basis="identity", exact_sinks=0, exact_recent=0)),
    }


def repredict(path: Path, steps: int, chunk: int) -> None:
    """Replace the predictions of a stored report by the current planner's; measurements are untouched."""
    report = json.loads(path.read_text())
    cuda = "cpu" not in report["device"]
    for row in report["results"]:
        shape = dict(SHAPES[row["shape"]], num_hidden_layers=row["layers"])
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**shape))
        row_steps, row_chunk = row.get("steps", steps), row.get("chunk", chunk)
        seen_after = row["context"] + 3 + row_steps  # prefill, 3 warm-up steps, the timed steps
        row.update(predict(model, caches(row["context"])[row["cache"]], row["batch"], row["context"], seen_after,
                           row_chunk, "bf16" if cuda else "fp32"))
        if "peak_allocated" in row:
            row["peak_vs_predicted"] = row["peak_allocated"] / row["predicted_peak_bytes"]
        print(f"{row['cache']:>12} batch {row['batch']}: predicted KV {row['predicted_kv_bytes']} "
              f"(measured {row['kv_bytes']}), peak {row.get('peak_vs_predicted', float('nan')):.3f} of predicted")
    report["predictions"] = "recomputed with --repredict from the stored measurements"
    path.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=SHAPES, default="llama-3.1-8b")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=None, help="default: results/decode_speed-<device>.json")
    parser.add_argument("--repredict", type=Path, default=None, metavar="FILE",
                        help="recompute the planner's predictions for a stored report with the current formula "
                        "(no device needed; measured columns are kept) and rewrite it")
    args = parser.parse_args()
    if args.repredict:
        repredict(args.repredict, args.steps, args.chunk)
        return
    torch.manual_seed(0)
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device(args.device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype).eval()
    model.config._attn_implementation = "sdpa"
    vocab = shape["vocab_size"]
    rows = []
    for batch in args.batch:
        ids = torch.randint(0, vocab, (batch, args.context), device=args.device)
        for name, policies in caches(args.context).items():
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if cuda else 0
            cache = CompressedCache(model, *policies, prefill_chunk=args.chunk)
            with torch.inference_mode():
                logits = cache.prefill(ids)
                nxt = logits.argmax(-1, keepdim=True)
                for _ in range(3):
                    nxt = model(nxt, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
                with Timer(args.device) as timer:
                    for _ in range(args.steps):
                        nxt = model(nxt, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
            row = {"cache": name, "batch": batch, "context": args.context, "shape": args.shape,
                   "layers": shape["num_hidden_layers"], "steps": args.steps, "chunk": args.chunk,
                   "ms_per_step": timer.ms / args.steps,
                   "kv_bytes": cache.nbytes(), "dense_kv_bytes": cache.dense_nbytes()}
            row.update(predict(model, policies, batch, args.context, cache.get_seq_length(), args.chunk,
                               "bf16" if cuda else "fp32"))
            if cuda:
                row["peak_allocated"] = torch.cuda.max_memory_allocated()
                row["resident_before"] = base
                row["peak_vs_predicted"] = row["peak_allocated"] / row["predicted_peak_bytes"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            cache.detach()
            del cache
    dynamic = {r["batch"]: r["ms_per_step"] for r in rows if r["cache"] == "dynamic"}
    for r in rows:
        r["step_time_vs_dynamic"] = r["ms_per_step"] / dynamic[r["batch"]]
    device = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    report = {"benchmark": "decode_speed", "device": device, "torch": torch.__version__, "results": rows}
    out = args.out or Path(__file__).parent / "results" / f"decode_speed-{'cuda' if cuda else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Planner check: predicted vs measured memory for a few plans (peak RSS on CPU, max_memory_allocated on a GPU).

For each plan: ask `kvpress_aqua.planner.plan` for the recommendation (and, for some plans, also the
k_ratio 0.5 candidate), then, in a fresh process, build the model, note the memory after loading,
run the plan's cache (chunked prefill through `cache.prefill`, then `new_tokens - 1` decode steps)
and read the peak. Compared:

- `cache_bytes`: the planner's KV prediction vs `cache.nbytes()` (should be equal);
- `run_bytes`: the planner's peak above the loaded model (KV held + attention scores + activations +
  layer copy + AQUA projections) vs the measured peak above the post-load baseline;
- `total_bytes`: the planner's total vs the absolute peak (CPU: VmHWM, whose non-weight part is
  what the planner's `overhead` constant stands for; GPU: max_memory_allocated, which leaves the
  CUDA context out, so the planner's total is compared without its overhead).

The model is built untrained from its config (`--init random`, the default; weights change no byte)
or loaded with `kvpress_aqua.loading.load_model()` (`--init load`, SmolLM2-135M-Instruct only).
AQUA runs with `basis="identity"`: the same bytes as a calibrated basis, with no artifact needed.

On CPU, glibc keeps freed buffers below its dynamic mmap threshold (up to 32 MiB) on the heap, so
peak RSS runs above the live tensors; `--fixed-mmap` runs each plan with
`MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=131072`, so that RSS follows the live tensors.

Run: python benchmarks/plan_rss.py                       # CPU, SmolLM2-135M shapes, fp32
     python benchmarks/plan_rss.py --fixed-mmap          # CPU, RSS without glibc heap retention
     python benchmarks/plan_rss.py --device cuda          # GPU, Llama-3.2-1B shapes, bf16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

CPU_PLANS = {
    "2k-one-chunk": dict(budget="2GB", context=2048, batch=1, new_tokens=16, prefill_chunk=None),
    "4k-chunk512": dict(budget="1.3GB", context=4096, batch=1, new_tokens=16, prefill_chunk=512),
    "4k-batch2-tight": dict(budget="1.25GB", context=4096, batch=2, new_tokens=16, prefill_chunk=256),
    "8k-chunk256-tight": dict(budget="1.2GB", context=8000, batch=1, new_tokens=32, prefill_chunk=256),
}
GPU_PLANS = {
    "32k-batch4-chunk512": dict(budget="5GB", context=32768, batch=4, new_tokens=32, prefill_chunk=512),
    "16k-batch8-chunk256": dict(budget="4.5GB", context=16384, batch=8, new_tokens=32, prefill_chunk=256),
    "32k-batch1-chunk1k": dict(budget="4.5GB", context=32768, batch=1, new_tokens=32, prefill_chunk=1024),
    "4k-batch2-one-chunk": dict(budget="8GB", context=4096, batch=2, new_tokens=32, prefill_chunk=None),
}
FIXED_MMAP = 131072
WITH_HALF_K = {"4k-chunk512", "8k-chunk256-tight", "32k-batch4-chunk512"}
"""Plans whose k_ratio 0.5 candidate is measured too (so AQUA's projections and key bytes are covered)."""


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Set the kernel's peak-RSS mark (VmHWM) to the current RSS, forgetting the model load."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _plan(shape_name: str, dtype: str, settings: dict):
    from kvpress_aqua.planner import plan

    return plan(model=shape_name, dtype=dtype, **settings)


def _candidates(result, half_k: bool) -> list:
    chosen = [result.recommendation]
    if half_k:
        chosen += [c for c in result.candidates if c.k_ratio == 0.5 and c.fits]
    return chosen


def _build(shape_name: str, init: str, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    from kvpress_aqua.planner import resolve_model

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if init == "load":
        from kvpress_aqua.loading import load_model

        return load_model(dtype=torch_dtype, device=device)[0]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(resolve_model(shape_name).config, dtype=torch_dtype)
    return model.eval()


def run_one(shape_name: str, init: str, device: str, dtype: str, name: str, index: int) -> dict:
    """Measure one candidate of one plan in this process."""
    import torch

    from kvpress_aqua import CompressedCache
    from kvpress_aqua.spec import PolicySpec

    settings = (GPU_PLANS if device == "cuda" else CPU_PLANS)[name]
    result = _plan(shape_name, dtype, settings)
    cand = _candidates(result, name in WITH_HALF_K)[index]
    model = _build(shape_name, init, device, dtype)
    entries = tuple({**e, "basis": "identity"} if e["type"] == "aqua" else e for e in cand.entries)
    chunk = settings["prefill_chunk"]
    cache = CompressedCache(model, *PolicySpec("plan", entries).build(), prefill_chunk=chunk)
    ids = torch.randint(100, model.config.vocab_size, (settings["batch"], settings["context"]),
                        generator=torch.Generator().manual_seed(0)).to(device)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _status_bytes("VmRSS")
        _reset_peak_rss()
    with torch.inference_mode():
        logits = cache.prefill(ids)
        for _ in range(settings["new_tokens"] - 1):
            logits = model(logits.argmax(-1, keepdim=True), past_key_values=cache).logits[:, -1]
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_bytes("VmHWM")
    m = cand.memory
    predicted_run = m.projections + m.peak_kv + m.working_set
    predicted_total = m.total - (m.overhead if device == "cuda" else 0)
    return {
        "plan": name, **settings, "dtype": dtype, "device": device,
        "k_ratio": cand.k_ratio, "token_budget": cand.token_budget, "policies": [dict(e) for e in entries],
        "verdict": cand.verdict, "estimated_quality": round(cand.quality, 4),
        "cache_bytes_predicted": m.cache_bytes, "cache_bytes_measured": cache.nbytes(),
        "run_bytes_predicted": predicted_run, "run_bytes_measured": peak - baseline,
        "run_ratio_measured_over_predicted": round((peak - baseline) / predicted_run, 3),
        "total_bytes_predicted": predicted_total, "total_bytes_measured": peak,
        "total_ratio_measured_over_predicted": round(peak / predicted_total, 3),
        "weights_bytes_predicted": m.weights, "baseline_bytes_measured": baseline,
        "overhead_bytes_planned": m.overhead, "overhead_bytes_measured": baseline - m.weights,
        "peak_phase_predicted": m.peak_phase,
        "predicted_breakdown": {"peak_kv": m.peak_kv, "attention": m.attention, "activations": m.activations,
                                "copy": m.copy, "projections": m.projections},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shape", default=None, help="offline-table model (default: smollm2-135m on CPU, "
                        "llama-3.2-1b on a GPU)")
    parser.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on a GPU)")
    parser.add_argument("--init", choices=("random", "load"), default="random")
    parser.add_argument("--fixed-mmap", action="store_true", help="fix glibc's mmap/trim thresholds at 128 KiB")
    parser.add_argument("--one", nargs=2, metavar=("PLAN", "INDEX"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    shape = args.shape or ("llama-3.2-1b" if args.device == "cuda" else "smollm2-135m")
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.one:
        print(json.dumps(run_one(shape, args.init, args.device, dtype, args.one[0], int(args.one[1]))))
        return
    plans = GPU_PLANS if args.device == "cuda" else CPU_PLANS
    env = dict(os.environ)
    if args.fixed_mmap:
        env.update(MALLOC_MMAP_THRESHOLD_=str(FIXED_MMAP), MALLOC_TRIM_THRESHOLD_=str(FIXED_MMAP))
    results = []
    for name, settings in plans.items():
        result = _plan(shape, dtype, settings)
        if not result.fits:
            print(f"{name}: {result.message}", file=sys.stderr)
            continue
        for index in range(len(_candidates(result, name in WITH_HALF_K))):
            cmd = [sys.executable, __file__, "--device", args.device, "--shape", shape, "--dtype", dtype,
                   "--init", args.init, "--one", name, str(index)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{name:>20} k={r['k_ratio']:<6g} tokens={r['token_budget']}: cache {r['cache_bytes_measured']:,} "
                  f"(predicted {r['cache_bytes_predicted']:,}); run {r['run_bytes_measured'] / 2**20:8.1f} MiB vs "
                  f"{r['run_bytes_predicted'] / 2**20:8.1f} predicted ({r['run_ratio_measured_over_predicted']}); "
                  f"total {r['total_bytes_measured'] / 2**20:8.1f} MiB vs {r['total_bytes_predicted'] / 2**20:8.1f}",
                  file=sys.stderr)
    import torch

    host = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    if args.device == "cuda":
        host += f", {torch.cuda.get_device_name()}"
    report = {"benchmark": "plan_rss", "shape": shape, "dtype": dtype, "device": args.device, "init": args.init,
              "host": host, "malloc": f"fixed mmap/trim thresholds {FIXED_MMAP}" if args.fixed_mmap else "default",
              "measure": "VmHWM (peak RSS)" if args.device == "cpu" else "torch.cuda.max_memory_allocated",
              "results": results}
    suffix = ("" if args.device == "cpu" else "-cuda") + ("-fixed-mmap" if args.fixed_mmap else "")
    out = args.out or Path(__file__).parent / "results" / f"plan_rss{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

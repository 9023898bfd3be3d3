"""Planner check: predicted vs measured memory for a few plans (peak RSS on CPU, max_memory_allocated on a GPU).

For each plan: ask `kvpress_aqua.planner.search.plan` for the recommendation (and, for some plans, also the
k_ratio 0.5 candidate), then, in a fresh process, build the model, note the memory after loading,
run the plan's cache (chunked prefill through `cache.prefill`, then `new_tokens - 1` decode steps)
and read the peak. Compared:

- `cache_bytes`: the planner's KV prediction vs `cache.nbytes()` (should be equal);
- `run_bytes`: the planner's peak above the loaded model (KV held, on CPU a retrieval tier's host
  rows too, attention scores, activations, layer copy, AQUA projections) vs the measured peak above
  the post-load baseline;
- `working_set_bytes`: the run bytes less the KV held at the peak and the projections (both exact),
  i.e. the attention scores, activations and layer copy the planner estimates;
- `total_bytes`: the planner's total vs the absolute peak (CPU: VmHWM, whose non-weight part is
  what the planner's `overhead` constant stands for; GPU: max_memory_allocated, which leaves the
  CUDA context out, so the planner's total is compared without its overhead).

On CPU each candidate runs twice, in fresh processes: with glibc's default allocator settings
(`*_measured`), and with its mmap and trim thresholds pinned at 128 KiB by
`kvpress_aqua.util.malloc.pin_malloc_thresholds` (`*_measured_pinned`): by default glibc keeps freed
buffers below its dynamic mmap threshold (up to 32 MiB) on the heap, so RSS runs above the live
tensors by an amount that changes from run to run. `--live` adds a third run that records the peak
of live tensor bytes with the PyTorch profiler's memory events (`*_live`; the CPU counterpart of
max_memory_allocated; slow).

The model is built untrained from its config (`--init random`, the default; weights change no byte)
or loaded with `kvpress_aqua.loading.load_model()` (`--init load`, SmolLM2-135M-Instruct only).
AQUA runs with `basis="identity"`: the same bytes as a calibrated basis, with no artifact needed.

`--repredict FILE` runs nothing: it prints the stored measurements of a results file next to the
current planner's predictions for the same points (same plan settings, k_ratio and token budget),
for results measured before a change of the planner's working-set model.

Run: OMP_NUM_THREADS=1 python benchmarks/plan_rss.py     # CPU, SmolLM2-135M shapes, fp32
     python benchmarks/plan_rss.py --live                 # CPU, plus the live-tensor peak
     python benchmarks/plan_rss.py --device cuda          # GPU, Llama-3.2-1B shapes, bf16
     python benchmarks/plan_rss.py --repredict benchmarks/results/plan_rss-cuda.json
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

from rss import reset_peak_rss, status_bytes

CPU_PLANS = {
    "2k-one-chunk": dict(budget="2GB", context=2048, batch=1, new_tokens=16, prefill_chunk=None),
    "4k-chunk512": dict(budget="1.3GB", context=4096, batch=1, new_tokens=16, prefill_chunk=512),
    "4k-batch2-tight": dict(budget="1.25GB", context=4096, batch=2, new_tokens=16, prefill_chunk=256),
    "8k-chunk256-tight": dict(budget="1.2GB", context=8000, batch=1, new_tokens=32, prefill_chunk=256),
    "4k-retrieval": dict(budget="60MB", context=4096, batch=1, new_tokens=16, prefill_chunk=512,
                         token_policy="retrieval", host_budget="400MB"),
}
GPU_PLANS = {
    "32k-batch4-chunk512": dict(budget="5GB", context=32768, batch=4, new_tokens=32, prefill_chunk=512),
    "16k-batch8-chunk256": dict(budget="4.5GB", context=16384, batch=8, new_tokens=32, prefill_chunk=256),
    "32k-batch1-chunk1k": dict(budget="4.5GB", context=32768, batch=1, new_tokens=32, prefill_chunk=1024),
    "4k-batch2-one-chunk": dict(budget="8GB", context=4096, batch=2, new_tokens=32, prefill_chunk=None),
    "32k-batch4-retrieval-offload": dict(budget="1.5GB", context=32768, batch=4, new_tokens=32, prefill_chunk=1024,
                                         token_policy="retrieval", host_budget="8GB"),
    "16k-batch8-retrieval-int8": dict(budget="1GB", context=16384, batch=8, new_tokens=32, prefill_chunk=512,
                                      token_policy="retrieval", host_budget="8GB", proxy_dtype="int8"),
}
RETRIEVAL_KEYS = ("token_policy", "host_budget", "proxy_dtype")
"""Plan settings beyond the budget and shape, present only in retrieval plans (the tier on the host)."""
CPU_MODES = ("default", "pinned")
WITH_HALF_K = {"4k-chunk512", "8k-chunk256-tight", "32k-batch4-chunk512"}
"""Plans whose k_ratio 0.5 candidate is measured too (so AQUA's projections and key bytes are covered)."""


def _plan(shape_name: str, dtype: str, settings: dict):
    from kvpress_aqua.planner.search import plan

    return plan(model=shape_name, dtype=dtype, **settings)


def _candidates(result, half_k: bool) -> list:
    chosen = [result.recommendation]
    if half_k:
        chosen += [c for c in result.candidates if c.k_ratio == 0.5 and c.fits]
    return chosen


def _build(shape_name: str, init: str, device: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    from kvpress_aqua.planner.search import resolve_model

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if init == "load":
        from kvpress_aqua.loading import load_model

        return load_model(dtype=torch_dtype, device=device)[0]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(resolve_model(shape_name).config, dtype=torch_dtype)
    return model.eval()


def _live_peak(run) -> int:
    """Peak live tensor bytes while ``run()`` runs: running sum of the profiler's allocation/free events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def run_one(shape_name: str, init: str, device: str, dtype: str, name: str, index: int, mode: str) -> dict:
    """Measure one candidate of one plan in this process (CPU ``mode``: default, pinned or live)."""
    import torch

    from kvpress_aqua import CompressedCache
    from kvpress_aqua.presets.spec import PolicySpec
    from kvpress_aqua.util.malloc import pin_malloc_thresholds

    if mode == "pinned" and not pin_malloc_thresholds():
        raise RuntimeError("this C library has no mallopt: the pinned mode needs glibc")
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
        baseline = status_bytes("VmRSS")
        reset_peak_rss()
    def run() -> None:
        with torch.inference_mode():
            logits = cache.prefill(ids)
            for _ in range(settings["new_tokens"] - 1):
                logits = model(logits.argmax(-1, keepdim=True), past_key_values=cache).logits[:, -1]

    if mode == "live":
        peak = baseline + _live_peak(run)
    else:
        run()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    elif mode != "live":
        peak = status_bytes("VmHWM")
    m = cand.memory
    return {
        "plan": name, **settings, "dtype": dtype, "device": device, "threads": torch.get_num_threads(),
        "k_ratio": cand.k_ratio, "token_budget": cand.token_budget, "policies": [dict(e) for e in entries],
        "verdict": cand.verdict, "estimated_quality": round(cand.quality, 4),
        "cache_bytes_predicted": m.cache_bytes, "cache_bytes_measured": cache.nbytes(),
        "host_bytes_predicted": m.host, "host_bytes_measured": cache.nbytes("host"),
        "host_peak_bytes_predicted": m.host_peak,
        "peak_bytes": peak, "baseline_bytes": baseline,
        "weights_bytes_predicted": m.weights, "overhead_bytes_planned": m.overhead,
        "peak_phase_predicted": m.peak_phase,
        "predicted_breakdown": {"peak_kv": m.peak_kv, "attention": m.attention, "activations": m.activations,
                                "copy": m.copy, "projections": m.projections},
    }


def _compare(rows: dict[str, dict], device: str) -> dict:
    """One candidate's predictions against its measurements (one row per mode)."""
    first = next(iter(rows.values()))
    b = first["predicted_breakdown"]
    # a retrieval tier's host rows are in the CPU's RSS, not in a GPU's max_memory_allocated
    exact = b["peak_kv"] + b["projections"] + (first["host_peak_bytes_predicted"] if device == "cpu" else 0)
    run = exact + b["attention"] + b["activations"] + b["copy"]
    total = first["weights_bytes_predicted"] + run + (0 if device == "cuda" else first["overhead_bytes_planned"])
    out = {k: v for k, v in first.items() if k not in ("peak_bytes", "baseline_bytes")}
    out.update(run_bytes_predicted=run, working_set_bytes_predicted=run - exact, total_bytes_predicted=total)
    for mode, r in rows.items():
        suffix = "" if mode == "default" else f"_{mode}"
        measured = r["peak_bytes"] - r["baseline_bytes"]
        out[f"run_bytes_measured{suffix}"] = measured
        out[f"working_set_bytes_measured{suffix}"] = measured - exact
        out[f"working_set_ratio_measured_over_predicted{suffix}"] = round((measured - exact) / (run - exact), 3)
        out[f"run_ratio_measured_over_predicted{suffix}"] = round(measured / run, 3)
        if mode != "live":
            out[f"total_bytes_measured{suffix}"] = r["peak_bytes"]
            out[f"total_ratio_measured_over_predicted{suffix}"] = round(r["peak_bytes"] / total, 3)
            out[f"overhead_bytes_measured{suffix}"] = r["baseline_bytes"] - r["weights_bytes_predicted"]
        if r["cache_bytes_measured"] != first["cache_bytes_measured"]:
            raise RuntimeError(f"cache.nbytes() differs between the {mode} run and the first one")
    return out


def repredict(path: Path) -> list[dict]:
    """Stored measurements of ``path`` against the current planner's predictions for the same points."""
    report = json.loads(path.read_text())
    rows = []
    for r in report["results"]:
        keys = ("budget", "context", "batch", "new_tokens", "prefill_chunk", *RETRIEVAL_KEYS)
        settings = {k: r[k] for k in keys if k in r}
        mm = _plan(report["shape"], report["dtype"], settings).memory_model
        m = mm.evaluate(round(r["k_ratio"] * mm.shape.info.head_dim), r["token_budget"])
        exact = m.peak_kv + m.projections
        run = exact + m.working_set
        total = m.total - (m.overhead if report["device"] == "cuda" else 0)
        measured_ws = r["run_bytes_measured"] - exact
        rows.append({
            "plan": r["plan"], "k_ratio": r["k_ratio"], "token_budget": r["token_budget"],
            "cache_bytes_predicted": m.cache_bytes, "cache_bytes_measured": r["cache_bytes_measured"],
            "working_set_bytes_predicted": m.working_set, "working_set_bytes_measured": measured_ws,
            "working_set_ratio_measured_over_predicted": round(measured_ws / m.working_set, 3),
            "run_bytes_predicted": run, "run_bytes_measured": r["run_bytes_measured"],
            "run_ratio_measured_over_predicted": round(r["run_bytes_measured"] / run, 3),
            "total_bytes_predicted": total, "total_bytes_measured": r["total_bytes_measured"],
            "total_ratio_measured_over_predicted": round(r["total_bytes_measured"] / total, 3),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shape", default=None, help="offline-table model (default: smollm2-135m on CPU, "
                        "llama-3.2-1b on a GPU)")
    parser.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on a GPU)")
    parser.add_argument("--init", choices=("random", "load"), default="random")
    parser.add_argument("--live", action="store_true",
                        help="CPU: also record the peak of live tensor bytes with the profiler (slow)")
    parser.add_argument("--only", default=None, help="comma-separated plan names to run (default: all)")
    parser.add_argument("--repredict", type=Path, default=None, metavar="FILE",
                        help="print a results file's measurements against the current planner's predictions")
    parser.add_argument("--one", nargs=3, metavar=("PLAN", "INDEX", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    shape = args.shape or ("llama-3.2-1b" if args.device == "cuda" else "smollm2-135m")
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.repredict:
        print(json.dumps(repredict(args.repredict), indent=2))
        return
    if args.one:
        name, index, mode = args.one
        print(json.dumps(run_one(shape, args.init, args.device, dtype, name, int(index), mode)))
        return
    plans = GPU_PLANS if args.device == "cuda" else CPU_PLANS
    if args.only:
        unknown = set(args.only.split(",")) - set(plans)
        if unknown:
            parser.error(f"--only: unknown plan(s) {', '.join(sorted(unknown))}; choose from {', '.join(plans)}")
        plans = {k: v for k, v in plans.items() if k in args.only.split(",")}
    modes = ("cuda",) if args.device == "cuda" else CPU_MODES + (("live",) if args.live else ())
    results = []
    for name, settings in plans.items():
        result = _plan(shape, dtype, settings)
        if not result.fits:
            print(f"{name}: {result.message}", file=sys.stderr)
            continue
        for index in range(len(_candidates(result, name in WITH_HALF_K))):
            rows = {}
            for mode in modes:
                cmd = [sys.executable, __file__, "--device", args.device, "--shape", shape, "--dtype", dtype,
                       "--init", args.init, "--one", name, str(index), mode]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows["default" if mode == "cuda" else mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = _compare(rows, args.device)
            results.append(r)
            suffixes = {"default": "", "pinned": "_pinned", "live": "_live"}
            line = "; ".join(f"{mode} run {r['run_bytes_measured' + s] / 2**20:.1f} MiB "
                             f"({r['run_ratio_measured_over_predicted' + s]})"
                             for mode, s in suffixes.items() if "run_bytes_measured" + s in r)
            print(f"{name:>20} k={r['k_ratio']:<6g} tokens={r['token_budget']}: cache {r['cache_bytes_measured']:,} "
                  f"(predicted {r['cache_bytes_predicted']:,}); predicted run {r['run_bytes_predicted'] / 2**20:.1f} "
                  f"MiB; {line}", file=sys.stderr)
    import torch

    host = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    if args.device == "cuda":
        host += f", {torch.cuda.get_device_name()}"
    measure = "torch.cuda.max_memory_allocated"
    if args.device == "cpu":
        measure = ("VmHWM (peak RSS) with glibc's default malloc (*_measured) and with its mmap/trim thresholds "
                   "pinned at 128 KiB (*_measured_pinned)")
        if args.live:
            measure += "; peak live tensor bytes from the profiler's memory events (*_live)"
    report = {"benchmark": "plan_rss", "shape": shape, "dtype": dtype, "device": args.device, "init": args.init,
              "host": host, "measure": measure, "results": results}
    out = args.out or Path(__file__).parent / "results" / f"plan_rss{'' if args.device == 'cpu' else '-cuda'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

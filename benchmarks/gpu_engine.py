"""The GPU engine measured side by side in one run: prefill peak memory, decode step time, HBM roofline.

Llama-3.1-8B shape with random bf16 weights (weights change neither timing nor bytes), one GPU.

- ``prefill``: each cache prefills a random ``batch x context`` prompt in chunks; the peak of
  ``torch.cuda.max_memory_allocated`` above the weights is compared with the dense chunked prefill
  (a ``DynamicCache``) and with the planner's predicted peak. ``--caches`` takes the names of
  :func:`policies` and of the shipped presets (``h2o-aqua-4x``, ``snapkv-25``, ``retrieval-25``...).
- ``decode``: decode-step time with each cache holding its steady state. The caches are filled with
  random keys and values instead of a prefill (timing does not depend on the values), then decode
  ``--steps`` tokens; the median step is reported with its multiple of the HBM roofline (bytes the
  step must read: weights plus the held keys, values and slot metadata, at 4.8 TB/s). Baselines:
  ``DynamicCache`` eager; ``transformers`` ``StaticCache`` with the step under
  ``torch.compile(mode="reduce-overhead")`` holding the full context and holding the compressed
  caches' token count. The compressed caches are made static and run the same compiled step
  (:mod:`kvpress_aqua.evaluation.static_decode`) with the fused Triton kernel.

Run: python benchmarks/gpu_engine.py prefill --batch 8 --context 32768 --chunk 2048 --out FILE
     python benchmarks/gpu_engine.py decode --batch 8 --context 32768 --out FILE
AQUA runs with ``basis="identity"`` (no calibration for random weights): same bytes and cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import traceback
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from kvpress_aqua import CompressedCache
from kvpress_aqua.evaluation.static_decode import compiled_step, decode_step
from kvpress_aqua.ops.triton_attention import tuned_configs
from kvpress_aqua.planner.memory import MemoryModel
from kvpress_aqua.planner.model_shape import resolve_model
from kvpress_aqua.policies import H2O, TOVA, Aqua, Retrieval, SlidingWindow
from kvpress_aqua.policies.registry import POLICY_TYPES
from kvpress_aqua.presets.spec import list_presets, parse_policy
from kvpress_aqua.util.compat import cache_kwargs

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
             num_hidden_layers=32)
HBM = 4.8e12
"""Bytes per second of the H200's HBM (datasheet)."""
PRESETS = tuple(name for name in list_presets() if name != "full")
"""``prefill --caches`` takes these shipped presets' names too (``kvtool presets``), beside :func:`policies`' names."""
TINY = dict(SHAPE, hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
            vocab_size=512, num_hidden_layers=2)
"""``--tiny``: a 2-layer model of the same layout, to check the script on a CPU before a GPU run."""
DEVICE = "cuda"
PROFILE: dict = {"steps": 0, "last": None, "host_ms": None, "pipelined_ms": None, "repeats": 1, "samples": None}
"""``--profile N``: the last N timed steps of each decode run also run under the PyTorch profiler.
``--repeats R``: the pipelined timing runs R times back to back; the row gives each and their median."""
STREAM: dict = {"path": None}
"""Where :func:`emit` appends each row as it is measured (``OUT.rows.jsonl``), so a cut run keeps its rows."""


def emit(row: dict) -> None:
    """Print one finished row and append it to the stream file."""
    line = json.dumps(row)
    print(line, flush=True)
    if STREAM["path"] is not None:
        with open(STREAM["path"], "a") as f:
            f.write(line + "\n")


def policies(name: str, context: int) -> tuple:
    """The compressed caches at a quarter of the context's tokens.

    ``*-aqua`` adds AQUA at half the key channels with its default exact tokens (4 + 64 at full
    width); ``*-aqua-mem`` the same without exact tokens (every key at half width: memory mode only).
    """
    quarter = context // 4
    heavy, recent = (quarter - 4) // 2, quarter - 4 - (quarter - 4) // 2
    token = {"sliding": SlidingWindow(sinks=4, window=quarter - 4), "h2o": H2O(heavy=heavy, recent=recent, sinks=4),
             "tova": TOVA(heavy=heavy, recent=recent, sinks=4)}[name.split("-")[0]]
    if name.endswith("-aqua-mem"):
        return token, Aqua(k_ratio=0.5, basis="identity", exact_sinks=0, exact_recent=0)
    return (token, Aqua(k_ratio=0.5, basis="identity")) if name.endswith("-aqua") else (token,)


def make_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16 if DEVICE == "cuda" else torch.float32).eval()
    model.config._attn_implementation = "sdpa"
    return model


def preset_policies(name: str, context: int) -> tuple:
    """A shipped preset's policies sized for ``context``; AQUA with ``basis="identity"`` and uniform widths.

    Random weights have no calibration: the identity basis stores the same bytes at every layer
    (a calibrated ``per_layer="spectrum"`` spreads the same total over layers unevenly).
    """
    pols = parse_policy(name).build(context)
    return tuple(dataclasses.replace(p, basis="identity", per_layer="uniform") if isinstance(p, Aqua) else p
                 for p in pols)


def predicted_peak(model, pols: tuple, batch: int, context: int, chunk: int) -> int:
    """The planner's peak for this prefill, without its runtime overhead (after the cache bound ``pols``)."""
    token = next((p for p in pols if not isinstance(p, Aqua)), None)
    aqua = next((p for p in pols if isinstance(p, Aqua)), None)
    kind = next((row.name for row in POLICY_TYPES.values() if row.kind == "token"
                 and row.class_name == type(token).__name__), "h2o")
    extra = {}
    if isinstance(token, Retrieval):
        extra = dict(rank=token.rank, offload=token.offload, proxy_dtype=token.proxy_dtype)
    mm = MemoryModel(shape=resolve_model(model.config), batch=batch, context=context, new_tokens=0, dtype="bf16",
                     prefill_chunk=chunk, overhead=0, token_policy=kind,
                     exact_tokens=aqua.exact_sinks + aqua.exact_recent if aqua else 0, **extra)
    d = SHAPE["head_dim"]
    if token is None:
        knob = None
    elif isinstance(token, Retrieval):
        knob = max(token.layer_top_k(i) for i in range(SHAPE["num_hidden_layers"]))
    else:
        knob = token.halvings if mm.keeps_rate else token.budget
    return mm.evaluate(round(aqua.k_ratio * d) if aqua else d, knob).total


def run_prefill(model, batch: int, context: int, chunk: int, names: list[str]) -> list[dict]:
    rows = []
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, context), device=DEVICE)
    cuda = DEVICE == "cuda"
    weights = torch.cuda.memory_allocated() if cuda else sum(p.nbytes for p in model.parameters())
    for name in names:
        pols = () if name == "dense" else preset_policies(name, context) if name in PRESETS else policies(name, context)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            cache = CompressedCache(model, *pols, prefill_chunk=chunk)
            with torch.inference_mode():
                cache.prefill(ids)
            if cuda:
                torch.cuda.synchronize()
            row = {"cache": name, "batch": batch, "context": context, "chunk": chunk,
                   "seconds": round(time.perf_counter() - start, 2), "weights_bytes": weights,
                   "peak_allocated": torch.cuda.max_memory_allocated() if cuda else weights, "kv_bytes": cache.nbytes(),
                   "dense_kv_bytes": cache.dense_nbytes(), "policies": [repr(p) for p in pols]}
            row["peak_above_weights"] = row["peak_allocated"] - weights
            row["working_set"] = row["peak_allocated"] - weights - row["kv_bytes"]
            try:
                row["predicted_peak_bytes"] = predicted_peak(model, pols, batch, context, chunk)
                row["peak_vs_predicted"] = row["peak_allocated"] / row["predicted_peak_bytes"]
            except ValueError as err:  # a stack the planner does not model: the measurement still counts
                row["predicted_peak_bytes"] = None
                row["not_predicted"] = str(err)[:300]
            cache.detach()
            del cache
        except Exception as err:  # one failed cache must not lose the others' numbers
            row = {"cache": name, "batch": batch, "context": context, "error": repr(err)[:500]}
            traceback.print_exc()
        rows.append(row)
        emit(row)
    dense = next((r for r in rows if r["cache"] == "dense" and "peak_allocated" in r), None)
    for r in rows:
        if dense and "peak_allocated" in r:
            r["peak_vs_dense"] = r["peak_allocated"] / dense["peak_allocated"]
    return rows


def _random_kv(batch: int, tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (batch, SHAPE["num_key_value_heads"], tokens, SHAPE["head_dim"])
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    return (torch.randn(shape, generator=gen, device=DEVICE, dtype=dtype),
            torch.randn(shape, generator=gen, device=DEVICE, dtype=dtype))


def _fill(cache, batch: int, tokens: int, per_layer) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for i in range(SHAPE["num_hidden_layers"]):
        keys, values = _random_kv(batch, tokens, gen)
        per_layer(cache, i, keys, values)


def _time_compiled(model, cache, token, positions, mask_for, steps: int, warmup: int) -> tuple[float, float, bool]:
    """:func:`_time_steps` with the compiled step: whole graph, else (if that fails) with graph breaks."""
    try:
        return (*_time_steps(compiled_step(), model, cache, token, positions, mask_for, steps, warmup), True)
    except Exception:  # noqa: BLE001 - reported in the row as fullgraph False
        traceback.print_exc()
        torch._dynamo.reset()
        step = compiled_step(fullgraph=False)
        return (*_time_steps(step, model, cache, token, positions, mask_for, steps, warmup), False)


def _next_token(step, model, cache, token, positions, mask) -> torch.Tensor:
    """One greedy decode step (a new CUDA-graph step first): the next token ``(batch, 1)``."""
    if hasattr(torch.compiler, "cudagraph_mark_step_begin"):
        torch.compiler.cudagraph_mark_step_begin()
    return step(model, cache, token, positions, mask).argmax(-1, keepdim=True)


def _time_steps(step, model, cache, token, positions, mask_for, steps: int, warmup: int) -> tuple[float, float]:
    """Median ms per decode step (CUDA events around each step) after ``warmup`` steps, and the warm-up seconds.

    ``PROFILE["host_ms"]`` gets the median time the host takes to enqueue a step: the GPU waits for it
    (each step here ends with a synchronisation, as a generation loop's stopping check does).
    """
    times, host = [], []
    start = time.perf_counter()
    prof = None
    for i in range(warmup + steps):
        if PROFILE["steps"] and i == warmup + steps - PROFILE["steps"]:
            kinds = [torch.profiler.ProfilerActivity.CPU]
            if DEVICE == "cuda":
                kinds.append(torch.profiler.ProfilerActivity.CUDA)
            prof = torch.profiler.profile(activities=kinds)
            prof.__enter__()
        tick = time.perf_counter()
        if DEVICE == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        token = _next_token(step, model, cache, token, positions, mask_for(i))
        if i >= warmup:
            host.append((time.perf_counter() - tick) * 1e3)
        if DEVICE == "cuda":
            end.record()
            torch.cuda.synchronize()
        if i == warmup - 1:
            warm = time.perf_counter() - start
        if i >= warmup:
            times.append(begin.elapsed_time(end) if DEVICE == "cuda" else (time.perf_counter() - tick) * 1e3)
        positions = positions + 1
    if prof is not None:
        prof.__exit__(None, None, None)
        PROFILE["last"] = _kernels(prof, PROFILE["steps"])
    PROFILE["host_ms"] = round(statistics.median(host), 3)
    samples = [round(_pipelined(step, model, cache, token, positions + r * steps, mask_for, steps,
                                warmup + (1 + r) * steps), 3) for r in range(PROFILE["repeats"])]
    PROFILE["samples"] = samples
    PROFILE["pipelined_ms"] = statistics.median(samples)
    return statistics.median(times), warm


def _pipelined(step, model, cache, token, positions, mask_for, steps: int, first: int) -> float:
    """Ms per step over ``steps`` steps enqueued back to back, one synchronisation at the end.

    This is how :func:`~kvpress_aqua.evaluation.static_decode.generate_static` runs (no stopping
    check between steps): the host enqueues a step while the GPU runs the one before, so the time is
    the GPU's, gaps inside the CUDA graph included, as long as the host keeps ahead.
    """
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    tick = time.perf_counter()
    for i in range(first, first + steps):
        token = _next_token(step, model, cache, token, positions, mask_for(i))
        positions = positions + 1
    if DEVICE != "cuda":
        return (time.perf_counter() - tick) * 1e3 / steps
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / steps


def _kernels(prof, steps: int, top: int = 25) -> dict:
    """The kernels taking the most GPU time per step (CPU: self time of operators), and all kernels' totals.

    ``steps`` profiled steps are averaged. The totals (time and launches of every kernel) show what
    the top list leaves out; the rest of the step is gaps between kernels.
    """
    spent = (lambda e: e.self_device_time_total) if DEVICE == "cuda" else (lambda e: e.self_cpu_time_total)
    averages = prof.key_averages()
    on_device = (lambda e: e.device_type.name == "CUDA") if DEVICE == "cuda" else (lambda e: True)
    events = sorted((e for e in averages if spent(e) > 0 and on_device(e)), key=lambda e: -spent(e))
    host = sorted((e for e in averages if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    return {"profile": [{"kernel": e.key[:160], "us_per_step": round(spent(e) / steps, 1),
                         "calls_per_step": round(e.count / steps, 1)} for e in events[:top]],
            "kernel_us_per_step": round(sum(spent(e) for e in events) / steps, 1),
            "launches_per_step": round(sum(e.count for e in events) / steps, 1),
            "host_profile": [{"op": e.key[:100], "self_us_per_step": round(e.self_cpu_time_total / steps, 1),
                              "calls_per_step": round(e.count / steps, 1)} for e in host[:12]]}


def run_decode(model, batch: int, context: int, steps: int, warmup: int, names: list[str]) -> list[dict]:
    rows = []
    layers, kv_heads, d = SHAPE["num_hidden_layers"], SHAPE["num_key_value_heads"], SHAPE["head_dim"]
    weights = sum(p.nbytes for p in model.parameters())
    held = context // 4
    total = warmup + (1 + PROFILE["repeats"]) * steps  # the synchronised steps, then each pipelined repeat
    for name in names:
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
        skips = counters["inductor"]["cudagraph_skips"]  # a step CUDA graphs do not capture launches one by one
        token = torch.randint(0, SHAPE["vocab_size"], (batch, 1), device=DEVICE)
        try:
            with torch.inference_mode():
                if name == "dynamic-eager":
                    cache = DynamicCache()
                    _fill(cache, batch, context, lambda c, i, k, v: c.update(k, v, i))
                    positions = torch.full((batch, 1), context, device=DEVICE)

                    def step(model, cache, token, positions, _):
                        return model(token, position_ids=positions, use_cache=True, logits_to_keep=1,
                                     **cache_kwargs(model, cache)).logits[:, -1]

                    ms, warm = _time_steps(step, model, cache, token, positions, lambda i: None, steps, warmup)
                    fullgraph = None
                    kv_read = layers * batch * kv_heads * (context + total) * 2 * d * 2
                elif name.startswith("static-compiled"):
                    tokens = context if name == "static-compiled" else held
                    cache = StaticCache(config=model.config, max_cache_len=tokens + total)
                    _fill(cache, batch, tokens, lambda c, i, k, v: c.update(k, v, i))
                    positions = torch.full((batch, 1), tokens, device=DEVICE)
                    slots = torch.arange(tokens + total, device=DEVICE)
                    masks = [(slots <= tokens + i).expand(batch, 1, 1, -1) for i in range(total)]
                    ms, warm, fullgraph = _time_compiled(model, cache, token, positions, masks.__getitem__, steps,
                                                         warmup)
                    kv_read = layers * batch * kv_heads * (tokens + total) * (2 * d * 2 + 1)
                else:
                    compiled = not name.endswith("-eager")
                    pols = policies(name.removesuffix("-eager"), context)
                    cache = CompressedCache(model, *pols)

                    def fill(c, i, k, v):
                        c.layers[i].update(k, v)
                        c.layers[i].seen = context

                    _fill(cache, batch, pols[0].budget, fill)
                    cache.make_static(total)
                    positions = torch.full((batch, 1), context, device=DEVICE)
                    ones = torch.ones(batch, 1, 1, 1, dtype=torch.bool, device=DEVICE)
                    same = [ones] * total
                    if compiled:
                        ms, warm, fullgraph = _time_compiled(model, cache, token, positions, same.__getitem__, steps,
                                                             warmup)
                    else:
                        ms, warm = _time_steps(decode_step, model, cache, token, positions, same.__getitem__, steps,
                                               warmup)
                        fullgraph = None
                    kv_read = cache.nbytes()  # a step reads every held slot (keys, values, metadata)
            row = {"cache": name, "batch": batch, "context": context, "ms_per_step": round(ms, 3),
                   "tokens_per_s": round(batch * 1e3 / ms, 1), "warmup_seconds": round(warm, 1), "fullgraph": fullgraph,
                   "bytes_read": weights + kv_read, "roofline_ms": round((weights + kv_read) / HBM * 1e3, 3)}
            row["x_roofline"] = round(ms / row["roofline_ms"], 2)
            if PROFILE["last"] is not None:
                row.update(PROFILE["last"])
                PROFILE["last"] = None
            row["host_ms_per_step"] = PROFILE["host_ms"]
            row["pipelined_ms_per_step"] = PROFILE["pipelined_ms"]
            if PROFILE["repeats"] > 1:
                row["pipelined_samples_ms"] = PROFILE["samples"]
            row["pipelined_x_roofline"] = round(PROFILE["pipelined_ms"] / row["roofline_ms"], 2)
            row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
            if isinstance(cache, CompressedCache):
                if DEVICE == "cuda":
                    row["decode_kernel_configs"] = tuned_configs()
                row["kv_bytes"] = cache.nbytes()
                cache.detach()
            del cache
        except Exception as err:
            row = {"cache": name, "batch": batch, "context": context, "error": repr(err)[:800]}
            traceback.print_exc()
        rows.append(row)
        emit(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["prefill", "decode"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--caches", default=None, help="comma list (default: all of the mode)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: checks the script only")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="decode: profile the last N timed steps and add the top kernels to each row")
    parser.add_argument("--repeats", type=int, default=1, metavar="R",
                        help="decode: time the pipelined steps R times per cache (median and each in the row)")
    args = parser.parse_args()
    global DEVICE
    PROFILE["steps"] = args.profile
    PROFILE["repeats"] = args.repeats
    STREAM["path"] = args.out.with_name(args.out.name + ".rows.jsonl")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        SHAPE.update(TINY)
        DEVICE = "cpu"
    model = make_model()
    if args.mode == "prefill":
        names = (args.caches or "dense,sliding,h2o,tova,h2o-aqua").split(",")
        rows = run_prefill(model, args.batch, args.context, args.chunk, names)
    else:
        names = (args.caches or "dynamic-eager,static-compiled,static-compiled-held,sliding,sliding-aqua,h2o,tova,"
                 "h2o-eager").split(",")
        rows = run_decode(model, args.batch, args.context, args.steps, args.warmup, names)
    report = {"benchmark": f"gpu_engine {args.mode}",
              "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (--tiny: a check, not a result)",
              "torch": torch.__version__, "shape": "llama-3.1-8b (random bf16 weights)", "results": rows}
    previous = json.loads(args.out.read_text()) if args.out.exists() else None
    if previous:
        report["results"] = previous["results"] + rows
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

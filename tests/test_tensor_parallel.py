"""Tensor parallelism on CPU: transformers' ``tp_plan="auto"`` over 2 gloo processes, each rank's cache its own heads.

The test saves tiny random models (4 query / 2 KV heads) and AQUA artifacts calibrated on them,
runs every case in one process (the reference), then runs this file as a script under
``torch.distributed.run`` with 2 ranks, each loading the models sharded by ``transformers``. On
Llama each rank holds one KV head; Phi-3's plan gathers its fused q/k/v whole, so each of its ranks
holds both. The ranks never talk to each other about the cache. Greedy tokens and logits must
equal the single process's, each rank's kept slots must be the reference's slots of its heads, and
the ranks' bytes must add up to the single process's, less what every rank holds whole.
"""

import inspect
import itertools
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import byte_tokenizer, make_tiny_model
from transformers import AutoModelForCausalLM

from kvpress_aqua import CompressedCache
from kvpress_aqua.calibration import calibrate
from kvpress_aqua.core.accounting import START_BYTES
from kvpress_aqua.core.layer import CompressedLayer
from kvpress_aqua.core.parallel import head_share, local_kv_heads, shards_kv_heads, tensor_parallel_rank
from kvpress_aqua.policies import H2O, BalanceKV, Retrieval, Uniform
from kvpress_aqua.policies.aqua import Aqua
from kvpress_aqua.util.compat import cache_kwargs

WORLD = 2
TEXT = "A lighthouse keeper counts the ships that pass the harbour each night and logs the weather. " * 10
CASES = ("h2o+aqua", "retrieval-aqua", "retrieval-lrqk", "balancekv", "uniform", "plain")
SHARDED = {"llama": True, "phi3": False}
"""Whether transformers' tensor-parallel plan of the family splits the KV heads over ranks."""

gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                          reason="torch.distributed with the gloo backend is not available")


def _policies(case: str, artifact: Path) -> tuple:
    if case == "h2o+aqua":
        return H2O(heavy=5, recent=4), Aqua(k_ratio=0.5, exact_sinks=1, exact_recent=2, artifact=artifact)
    if case.startswith("retrieval"):
        return (Retrieval(top_k=4, recent=3, sinks=1, proxy=case.split("-")[1], rank=4, artifact=artifact),)
    if case in ("balancekv", "uniform"):  # random draws: each head's the same whichever rank holds it
        return ((BalanceKV if case == "balancekv" else Uniform)(halvings=1, sinks=2, recent=2, block=8),)
    return ()


def run_cases(model: torch.nn.Module, artifact: Path) -> dict[str, dict]:
    """Every case's greedy tokens, step logits, bytes and kept slot indices (per layer)."""
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    out = {}
    for case in CASES:
        cache = CompressedCache(model, *_policies(case, artifact))
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, **cache_kwargs(model, cache))
        out[case] = {
            "tokens": gen.sequences, "logits": torch.stack(gen.logits, 1), "nbytes": cache.nbytes(),
            "host": cache.nbytes("host"),
            "dense": cache.dense_nbytes(), "heads": cache.kv_heads,
            "policy_nbytes": cache.token_policy.nbytes() if cache.token_policy is not None else 0,
            "index": [layer.index.clone() if isinstance(layer, CompressedLayer) else None for layer in cache.layers],
        }
        cache.detach()
    return out


def test_the_plan_says_whether_heads_are_split() -> None:
    plans = {arch: type(make_tiny_model(arch).config).base_model_tp_plan for arch in SHARDED}
    assert {arch: shards_kv_heads(plan) for arch, plan in plans.items()} == SHARDED
    assert not shards_kv_heads({})
    assert not shards_kv_heads({"layers.*.self_attn.qkv_proj": "colwise_rep"})  # 4.57's name for a gathered output
    assert head_share(8, 3, 4) == range(6, 8)
    with pytest.raises(ValueError, match="do not split over 4"):
        head_share(2, 0, 4)


class _Mesh:
    """A stand-in for the (pp, fsdp, tp) device mesh transformers keeps on a sharded model."""

    mesh_dim_names = ("pp", "fsdp", "tp")

    def get_local_rank(self, name: str) -> int:
        return {"pp": 0, "fsdp": 1, "tp": 3}[name]


def test_a_rank_finds_its_heads_on_the_model() -> None:
    plan = {"model.layers.*.self_attn.k_proj": "colwise", "model.layers.*.self_attn.o_proj": "rowwise"}
    sharded = SimpleNamespace(tp_size=4, _device_mesh=_Mesh(), tp_plan=plan)
    assert tensor_parallel_rank(sharded) == (3, 4)
    assert local_kv_heads(sharded, 8) == range(6, 8)
    gathered = SimpleNamespace(tp_size=4, _device_mesh=_Mesh(),
                               tp_plan={"model.layers.*.self_attn.qkv_proj": "colwise_gather_output"})
    assert local_kv_heads(gathered, 8) == range(8)
    assert local_kv_heads(SimpleNamespace(tp_size=None), 8) == range(8)
    with pytest.raises(ValueError, match="carries no device mesh"):
        tensor_parallel_rank(SimpleNamespace(tp_size=2))


@gloo
def test_tp2_on_cpu_equals_one_process(tmp_path: Path) -> None:
    reference = {}
    for arch in SHARDED:
        model = make_tiny_model(arch)
        model.save_pretrained(tmp_path / arch)
        calibrate(model, byte_tokenizer(model.config.vocab_size), TEXT, tokens=400, chunk=128,
                  progress=False).save(tmp_path / f"{arch}.safetensors")
        reference[arch] = run_cases(model, tmp_path / f"{arch}.safetensors")
    # the ranks run on the CPU (gloo) even where a GPU is visible: this is the test CI can run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TP_TEST_DIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--standalone",
           __file__]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for (arch, cases), case in itertools.product(reference.items(), CASES):
        ref, where = cases[case], f"{arch} {case}"
        for rank, got in enumerate(r[arch][case] for r in ranks):
            heads = head_share(2, rank, WORLD) if SHARDED[arch] else range(2)
            assert got["heads"] == heads, where
            assert torch.equal(got["tokens"], ref["tokens"]), where
            torch.testing.assert_close(got["logits"], ref["logits"], atol=2e-5, rtol=1e-4, msg=where)
            for held, full in zip(got["index"], ref["index"], strict=True):
                if full is not None:  # eviction decided per KV head: the same slots as those heads' in one process
                    assert torch.equal(held, full[:, heads.start:heads.stop]), where
        # split by head: everything but what is per sequence (each layer's int32 left-padding count), Retrieval's
        # calibrated proxy bases included (docs/multi-gpu.md); unsplit: everything, on every rank
        batch, layers = ref["tokens"].shape[0], len(ref["index"])
        replicated = batch * START_BYTES * layers if case != "plain" else 0
        if not SHARDED[arch]:
            replicated = ref["nbytes"]
        elif case != "retrieval-aqua":
            assert ref["policy_nbytes"] == 0
        assert sum(r[arch][case]["nbytes"] for r in ranks) == ref["nbytes"] + (WORLD - 1) * replicated, where
        whole = 1 if SHARDED[arch] else WORLD
        assert sum(r[arch][case]["dense"] for r in ranks) == ref["dense"] * whole, where
        assert sum(r[arch][case]["host"] for r in ranks) == ref["host"] * whole, where  # the host tier, by head
        assert (ref["host"] > 0) == case.startswith("retrieval"), where


def _tp_auto() -> dict:
    """``from_pretrained``'s tensor-parallel argument: ``distributed_config`` since 5.x, ``tp_plan`` before."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    if "tp_plan" not in inspect.signature(DistributedConfig).parameters:
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_plan="auto")}


def _rank_main() -> None:
    """One tensor-parallel rank: load the saved models sharded by transformers, run the cases, save the results."""
    where = Path(os.environ["TP_TEST_DIR"])
    results = {}
    for arch in SHARDED:
        model = AutoModelForCausalLM.from_pretrained(where / arch, dtype=torch.float32, **_tp_auto()).eval()
        results[arch] = run_cases(model, where / f"{arch}.safetensors")
    torch.save(results, where / f"rank{os.environ['RANK']}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _rank_main()

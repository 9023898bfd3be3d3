"""Tensor parallelism on CPU: transformers' ``tp_plan="auto"`` over 2 gloo processes, each rank's cache its own heads.

The test saves a tiny random Llama (4 query / 2 KV heads) and an AQUA artifact calibrated on it,
runs every case in one process (the reference), then runs this file as a script under
``torch.distributed.run`` with 2 ranks, each loading the model sharded by ``transformers``. Each
rank holds one KV head; the ranks never talk to each other about the cache. Greedy tokens and
logits must equal the single process's, each rank's kept slots must be the reference's slots of
its head, and the ranks' bytes must add up to the single process's.
"""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import byte_tokenizer, make_tiny_model
from transformers import AutoModelForCausalLM

from kvpress_aqua import CompressedCache
from kvpress_aqua.calibration import calibrate
from kvpress_aqua.core.accounting import START_BYTES
from kvpress_aqua.core.layer import CompressedLayer
from kvpress_aqua.core.parallel import local_kv_heads
from kvpress_aqua.policies import H2O, Retrieval
from kvpress_aqua.policies.aqua import Aqua
from kvpress_aqua.util.compat import cache_kwargs

WORLD = 2
TEXT = "A lighthouse keeper counts the ships that pass the harbour each night and logs the weather. " * 10
CASES = ("h2o+aqua", "retrieval-aqua", "plain")

gloo = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                          reason="torch.distributed with the gloo backend is not available")


def _policies(case: str, artifact: Path) -> tuple:
    if case == "h2o+aqua":
        return H2O(heavy=5, recent=4), Aqua(k_ratio=0.5, exact_sinks=1, exact_recent=2, artifact=artifact)
    if case == "retrieval-aqua":
        return (Retrieval(top_k=4, recent=3, sinks=1, proxy="aqua", rank=4, offload=None, artifact=artifact),)
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
            "dense": cache.dense_nbytes(), "heads": cache.kv_heads,
            "policy_nbytes": cache.token_policy.nbytes() if cache.token_policy is not None else 0,
            "index": [layer.index.clone() if isinstance(layer, CompressedLayer) else None for layer in cache.layers],
        }
        cache.detach()
    return out


@gloo
def test_tp2_on_cpu_equals_one_process(tmp_path: Path) -> None:
    model = make_tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    artifact = tmp_path / "aqua.safetensors"
    calibrate(model, byte_tokenizer(model.config.vocab_size), TEXT, tokens=400, chunk=128,
              progress=False).save(artifact)
    reference = run_cases(model, artifact)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TP_TEST_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--standalone",
           __file__]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for case, ref in reference.items():
        for rank, got in enumerate(ranks):
            heads = local_kv_heads(model.config.num_key_value_heads, rank, WORLD)
            assert got[case]["heads"] == heads, case
            assert torch.equal(got[case]["tokens"], ref["tokens"]), case
            torch.testing.assert_close(got[case]["logits"], ref["logits"], atol=2e-5, rtol=1e-4, msg=case)
            for held, full in zip(got[case]["index"], ref["index"], strict=True):
                if full is not None:  # eviction decided per KV head: the same slots as that head's in one process
                    assert torch.equal(held, full[:, heads.start:heads.stop]), case
        # every rank holds what is per sequence, not per head (each layer's int32 left-padding count), and
        # Retrieval's calibrated proxy bases of every head (docs/multi-gpu.md); the rest is split by head
        batch, layers = ref["tokens"].shape[0], model.config.num_hidden_layers
        replicated = (batch * START_BYTES * layers if case != "plain" else 0) + ref["policy_nbytes"]
        if case != "retrieval-aqua":
            assert ref["policy_nbytes"] == 0
        assert sum(got[case]["nbytes"] for got in ranks) == ref["nbytes"] + (WORLD - 1) * replicated, case
        assert sum(got[case]["dense"] for got in ranks) == ref["dense"], case


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
    """One tensor-parallel rank: load the saved model sharded by transformers, run the cases, save the results."""
    where = Path(os.environ["TP_TEST_DIR"])
    model = AutoModelForCausalLM.from_pretrained(where / "model", dtype=torch.float32, **_tp_auto()).eval()
    torch.save(run_cases(model, where / "aqua.safetensors"), where / f"rank{os.environ['RANK']}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _rank_main()

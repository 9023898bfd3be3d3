"""Shared by the planner's tests (test_planner*.py): tiny configurations of every planned family, ``kvtool plan``
and a planned cache run.

Import it from tests as ``from planner_helpers import tiny_arch_model`` (pytest puts ``tests/`` on ``sys.path``).
These models differ from :mod:`tiny_models`: three layers, head_dim 32, and the families' sliding and hybrid
layouts (Gemma-2 alternating, Gemma-3 5:1, Phi-3 all sliding) and an MQA model with biases.
"""

import functools
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from kvpress_aqua import CompressedCache
from kvpress_aqua.cli import main
from kvpress_aqua.presets.spec import PolicySpec
from kvpress_aqua.util.compat import cache_kwargs

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, head_dim=32, pad_token_id=0, eos_token_id=1, bos_token_id=1, max_position_embeddings=512)
TINY_ARCHS = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "mistral": {"sliding_window": 16},
    "gemma2": {"sliding_window": 12},
    "gemma3_text": {"sliding_window": 10, "num_hidden_layers": 6},  # layers 0-4 sliding, 5 full
    "phi3": {"sliding_window": 20},
    "llama-mqa": {"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True},
}


def tiny_arch_config(arch: str) -> PretrainedConfig:
    """The config of ``arch``, a key of :data:`TINY_ARCHS` (``"llama-mqa"`` is a Llama)."""
    model_type = arch.split("-")[0]
    return AutoConfig.for_model(model_type, **{**TINY, **TINY_ARCHS[arch]})


def tiny_arch_model(arch: str) -> PreTrainedModel:
    """A random-weight model of :func:`tiny_arch_config`, seeded, in eval mode."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_arch_config(arch)).eval()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    """``kvtool plan *argv``: its exit code, stdout and stderr."""
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_planned_cache(model: PreTrainedModel, candidate: Any, batch: int, context: int,
                      new_tokens: int) -> tuple[int, int | None]:
    """Build a plan point's cache, prefill ``context`` random tokens in its chunk, decode ``new_tokens - 1`` steps.

    Returns ``cache.nbytes()`` at the end and the most KV (every layer's bytes, the projections not counted) the
    cache held while any layer's attention ran or at the end; ``None`` for a plain cache (no policy). Aqua's
    identity basis stores exactly the bytes of the SVD basis and needs no calibration artifact.
    """
    measured = run_planned(model, candidate, batch, context, new_tokens)
    return measured["device"], measured["max_device"]


def run_planned(model: PreTrainedModel, candidate: Any, batch: int, context: int, new_tokens: int) -> dict[str, Any]:
    """:func:`run_planned_cache`'s run, with a retrieval tier's host bytes too.

    Returns ``device`` and ``host`` (``cache.nbytes()`` and ``cache.nbytes("host")`` at the end), ``max_device``
    (as :func:`run_planned_cache`) and ``host_peak``: the most the host tiers held, at the end or while one grew
    (the tier replaces its tensors one at a time, so its old values, the largest, live beside the new ones).
    """
    entries = tuple({**e, "basis": "identity"} if e["type"] == "aqua" else e for e in candidate.entries)
    cache = CompressedCache(model, *PolicySpec("plan", entries).build(), prefill_chunk=candidate.prefill_chunk)
    held, hosts = [], []

    def kv() -> None:
        if cache.policies:
            held.append(sum(x.nbytes() for x in cache.layers))

    def grow(needed: int, step: bool, _grow: Any, tier: Any) -> None:
        before, old = tier.capacity, tier.host_tensors().get("tier_values")
        _grow(needed, step)
        if tier.capacity != before:
            hosts.append(sum(x.host_nbytes() for x in cache.layers) + (0 if old is None else old.nbytes))

    for layer in cache.layers:  # a layer's update returns just before its attention runs
        def update(*args: Any, _update: Any = layer.update, **kwargs: Any) -> Any:
            out = _update(*args, **kwargs)
            kv()
            return out

        layer.update = update
        if getattr(layer, "tier", None) is not None:
            layer.tier._grow = functools.partial(grow, _grow=layer.tier._grow, tier=layer.tier)
    ids = torch.randint(2, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    with torch.no_grad():
        logits = cache.prefill(ids)
        for _ in range(new_tokens - 1):
            logits = model(logits.argmax(-1, keepdim=True), **cache_kwargs(model, cache)).logits[:, -1]
    measured = {"device": cache.nbytes(), "host": cache.nbytes("host")}
    kv()
    cache.detach()
    return {**measured, "max_device": max(held, default=None), "host_peak": max([measured["host"], *hosts])}

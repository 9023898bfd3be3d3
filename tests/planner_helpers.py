"""Shared by the planner's tests (test_planner*.py): tiny configurations of every planned family and ``kvtool plan``.

Import it from tests as ``from planner_helpers import tiny_arch_model`` (pytest puts ``tests/`` on ``sys.path``).
These models differ from :mod:`tiny_models`: three layers, head_dim 32, and the families' sliding and hybrid
layouts (Gemma-2 alternating, Gemma-3 5:1, Phi-3 all sliding) and an MQA model with biases.
"""

from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from kvpress_aqua.cli import main

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

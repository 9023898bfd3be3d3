"""Tiny random-weight decoders built in code, one per supported family, for fast exact tests.

Import it from tests as ``from tiny_models import make_tiny_model`` (pytest puts ``tests/`` on ``sys.path``
because the folder has a ``conftest.py`` and no ``__init__.py``).
"""

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3")

_SHAPE = dict(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    intermediate_size=128,
    max_position_embeddings=512,
    # the families disagree on these (phi3 pads with id 32000, gemma swaps bos/eos): one setting for all
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)


def make_tiny_model(arch: str, **overrides: Any) -> PreTrainedModel:
    """Build a 2-layer, hidden-64, 4-query/2-KV-head (head_dim 16) causal LM with seeded random weights.

    Parameters
    ----------
    arch : str
        ``config.model_type``: one of :data:`ARCHS`.
    **overrides
        Config fields that replace the defaults, e.g. ``sliding_window=4`` for ``"mistral"`` (whose window is
        off, ``None``, unless given).

    Returns
    -------
    PreTrainedModel
        Float32, CPU, ``sdpa`` attention, eval mode; the same weights on every call with the same arguments.

    """
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    fields = dict(_SHAPE, **({"sliding_window": None} if arch == "mistral" else {}))
    config = AutoConfig.for_model(arch, **{**fields, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


def byte_tokenizer(vocab_size: int) -> Any:
    """A stand-in tokenizer for tiny models: one token per UTF-8 byte, folded into the vocabulary."""

    def tokenize(text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [b % vocab_size for b in text.encode()]}

    return tokenize

"""Shared fixtures: the real default model, loaded once per session, and tiny random models built in code."""

from collections.abc import Callable

import pytest
from tiny_models import make_tiny_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@pytest.fixture(scope="session")
def smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct and its tokenizer, float32 on CPU (converted from GGUF on first use, ~40 s)."""
    from kvpress_aqua.loading import load_model

    return load_model()


@pytest.fixture
def tiny_model() -> Callable[..., PreTrainedModel]:
    """The :func:`tiny_models.make_tiny_model` factory: ``tiny_model("qwen3", sliding_window=8)``."""
    return make_tiny_model

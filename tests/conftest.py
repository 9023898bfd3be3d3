"""Shared fixtures: the real default model, loaded once per session, tiny random models built in code, and an
empty artifact cache for the planner.

Without an NVIDIA device the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``).
Triton reads it when a kernel is defined, and ``transformers`` imports Triton on its own, so it is
set before anything else is imported.
"""

import glob
import os
import shutil

if not glob.glob("/dev/nvidia[0-9]*") and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402
from transformers import PreTrainedModel, PreTrainedTokenizerBase  # noqa: E402


@pytest.fixture(scope="session")
def smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct and its tokenizer, float32 on CPU (converted from GGUF on first use, ~40 s)."""
    from kvpress_aqua.loading import load_model

    return load_model()


@pytest.fixture
def tiny_model() -> Callable[..., PreTrainedModel]:
    """The :func:`tiny_models.make_tiny_model` factory: ``tiny_model("qwen3", sliding_window=8)``."""
    return make_tiny_model


@pytest.fixture
def no_artifacts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty kvpress-aqua cache: no AQUA artifact is found, so the planner uses its default quality curve."""
    monkeypatch.setenv("KVPRESS_AQUA_CACHE", str(tmp_path / "cache"))

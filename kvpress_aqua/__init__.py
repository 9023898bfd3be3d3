"""kvpress-aqua: compress the KV cache of Hugging Face decoders along tokens and key channels.

The public names are loaded on first use (PEP 562): ``from kvpress_aqua import CompressedCache`` imports
the cache (and torch), while importing a torch-free submodule such as :mod:`kvpress_aqua.planner`
imports nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._version import __version__
from .util.lazy import lazy_exports

_EXPORTS = {
    "CompressedCache": "core.cache",
    "CompressedLayer": "core.layer",
    "MemoryReport": "core.report",
    "ModelInfo": "model_info",
    "PolicySpec": "presets.spec",
    "UnsupportedModelError": "model_info",
    "load_model": "loading",
    "parse_policy": "presets.spec",
    "plan": "planner.search",
}
"""Public name -> the submodule defining it."""

__all__ = [
    "CompressedCache",
    "CompressedLayer",
    "MemoryReport",
    "ModelInfo",
    "PolicySpec",
    "UnsupportedModelError",
    "__version__",
    "load_model",
    "parse_policy",
    "plan",
]

if TYPE_CHECKING:
    from .core.cache import CompressedCache
    from .core.layer import CompressedLayer
    from .core.report import MemoryReport
    from .loading import load_model
    from .model_info import ModelInfo, UnsupportedModelError
    from .planner.search import plan
    from .presets.spec import PolicySpec, parse_policy


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

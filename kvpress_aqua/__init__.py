"""kvpress-aqua: compress the KV cache of Hugging Face decoders along tokens and key channels."""

from .cache import CompressedCache, CompressedLayer, MemoryReport
from .loading import load_model
from .model_info import ModelInfo, UnsupportedModelError
from .planner import plan
from .spec import PolicySpec, parse_policy

__version__ = "0.1.0"

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

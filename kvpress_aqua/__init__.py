"""kvpress-aqua: compress the KV cache of Hugging Face decoders along tokens and key channels."""

from .cache import CompressedCache, CompressedLayer, MemoryReport
from .model_info import ModelInfo, UnsupportedModelError

__version__ = "0.1.0"

__all__ = ["CompressedCache", "CompressedLayer", "MemoryReport", "ModelInfo", "UnsupportedModelError", "__version__"]

"""Attention shapes of a decoder model, read from its config alone (no weights)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelInfo", "UnsupportedModelError"]

# Families whose KV cache is not (batch, kv_heads, seq, head_dim) keys and values per layer.
_UNSUPPORTED = {
    "deepseek_v2": "multi-head latent attention (MLA) caches a compressed latent, not per-head keys",
    "deepseek_v3": "multi-head latent attention (MLA) caches a compressed latent, not per-head keys",
    "mamba": "a state-space model (SSM) has no KV cache",
    "mamba2": "a state-space model (SSM) has no KV cache",
    "falcon_mamba": "a state-space model (SSM) has no KV cache",
    "rwkv": "a recurrent model has no KV cache",
    "jamba": "hybrid SSM/attention models are not supported yet",
    "zamba": "hybrid SSM/attention models are not supported yet",
    "zamba2": "hybrid SSM/attention models are not supported yet",
    "bamba": "hybrid SSM/attention models are not supported yet",
    "gpt_oss": "attention sinks (s_aux) are not supported yet",
}


class UnsupportedModelError(ValueError):
    """The model's family has no per-head KV cache this package can compress."""


@dataclass(frozen=True)
class ModelInfo:
    """Shapes of a decoder's attention, as the cache and the planner need them.

    Attributes
    ----------
    model_type : str
        ``config.model_type`` (``"llama"``, ``"qwen2"``...).
    num_layers, num_heads, num_kv_heads, head_dim : int
        Decoder layers, query heads, KV heads and key/value width per head.
    sliding_window : int or None
        Window of the model's own sliding-window layers, if any.
    layer_types : tuple of str
        ``"full_attention"`` or ``"sliding_attention"`` per layer.
    name : str
        Where the config came from (hub id, path or ``config.name_or_path``).
    fingerprint : str
        Short hash of the shape-defining config fields; AQUA artifacts are keyed by it.

    """

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None
    layer_types: tuple[str, ...]
    name: str
    fingerprint: str

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA, ``num_heads`` for MQA)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> ModelInfo:
        """Read the shapes from a ``transformers`` config (or its text sub-config for multimodal models).

        Raises
        ------
        UnsupportedModelError
            For families without a per-head KV cache (MLA, SSM, recurrent).

        """
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        model_type = getattr(config, "model_type", "unknown")
        if model_type in _UNSUPPORTED:
            raise UnsupportedModelError(
                f"model type {model_type!r} is not supported: {_UNSUPPORTED[model_type]}. "
                "Use a decoder with standard multi-head/grouped-query attention."
            )
        if getattr(config, "kv_lora_rank", None) is not None:
            raise UnsupportedModelError(
                f"model type {model_type!r} uses multi-head latent attention (MLA); it is not supported."
            )
        num_heads = int(config.num_attention_heads)
        num_kv = int(getattr(config, "num_key_value_heads", None) or num_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        num_layers = int(config.num_hidden_layers)
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is None:
            kind = "sliding_attention" if window and _uses_sliding(config) else "full_attention"
            layer_types = [kind] * num_layers
        fields = {
            "model_type": model_type,
            "layers": num_layers,
            "heads": num_heads,
            "kv_heads": num_kv,
            "head_dim": int(head_dim),
            "hidden": getattr(config, "hidden_size", None),
            "vocab": getattr(config, "vocab_size", None),
            # transformers 5 moved rope_theta into rope_parameters, so 5 always hashed None here; None on
            # every major keeps an artifact found whichever transformers reads it (and the digests stable)
            "rope_theta": None,
        }
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
        return cls(
            model_type=model_type,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv,
            head_dim=int(head_dim),
            sliding_window=int(window) if window else None,
            layer_types=tuple(layer_types),
            name=name or getattr(config, "name_or_path", "") or model_type,
            fingerprint=digest,
        )

    def is_sliding(self, layer_idx: int) -> bool:
        """Whether the model itself limits this layer to its sliding window."""
        return self.layer_types[layer_idx] == "sliding_attention" and self.sliding_window is not None


def _uses_sliding(config: Any) -> bool:
    """Mistral-style configs carry ``sliding_window`` for every layer unless ``use_sliding_window`` is off."""
    return bool(getattr(config, "use_sliding_window", True))

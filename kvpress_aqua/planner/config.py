"""Model configs read as plain JSON, without torch or transformers.

The planner needs a handful of config fields (layers, heads, widths, sliding layers...), and importing
``transformers``' config classes imports torch (seconds). This module reads ``config.json`` as JSON and
fills in what the file leaves out with the defaults of ``transformers``' own config class, for the
families the planner knows (:data:`FAMILY_DEFAULTS`), applying the same derivations
(``num_key_value_heads`` defaults to the heads, ``head_dim`` to ``hidden_size / heads``, Qwen's sliding
window only with ``use_sliding_window``, Gemma-2/3's layer pattern, Gemma-3's ``text_config``...).
The result, a :class:`JsonConfig`, answers the same attribute reads as the ``transformers`` config,
so :meth:`kvpress_aqua.model_info.ModelInfo.from_config` gives the same shapes **and fingerprint** from
either (the tests hold the two equal on every offline entry and the tiny test models).

``rope_theta``, part of the fingerprint, is reproduced as the installed ``transformers`` exposes it:
transformers 5 moves it into ``rope_parameters`` (``getattr(config, "rope_theta", None)`` is ``None``),
transformers 4 keeps it as an attribute with a family default (10000; 10^6 for Gemma-3).

Families outside the table are read as their JSON says, with no defaults (as a plain
``PretrainedConfig``); the planner counts their parameters with the Llama layout and says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import lru_cache
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "FAMILY_DEFAULTS",
    "KNOWN_FAMILIES",
    "JsonConfig",
    "config_from_dict",
    "hub_config_dict",
    "offline_entry",
    "offline_models",
    "read_config_file",
]

_LLAMA = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "max_position_embeddings": 2048,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
}
_QWEN = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 32768,
    "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
    "layer_types": None,
}
_GEMMA2 = {
    "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 8192,
    "tie_word_embeddings": True, "attention_bias": False, "sliding_window": 4096, "layer_types": None,
}
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA,
    "mistral": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "max_position_embeddings": 131072,
        "tie_word_embeddings": False, "sliding_window": 4096,
    },
    "qwen2": _QWEN,
    "qwen3": {**_QWEN, "head_dim": 128, "attention_bias": False},
    "gemma": {
        "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256, "max_position_embeddings": 8192,
        "tie_word_embeddings": True, "attention_bias": False,
    },
    "gemma2": _GEMMA2,
    "gemma3_text": {**_GEMMA2, "vocab_size": 262208, "max_position_embeddings": 131072,
                    "use_bidirectional_attention": False},
    "gemma3": {"tie_word_embeddings": True},
    "phi3": {
        "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "max_position_embeddings": 4096,
        "tie_word_embeddings": False, "sliding_window": None,
    },
}
"""Per family, the defaults of ``transformers``' config class (5.x) for the fields the planner reads."""

KNOWN_FAMILIES = frozenset(FAMILY_DEFAULTS)
"""Families whose defaults and parameter layout the planner knows exactly."""

_TEXT_FAMILY = {"gemma3": "gemma3_text"}
"""Multimodal families and the family of their ``text_config`` (its ``model_type`` whatever the file says)."""
_ROPE_THETA_V4 = {family: 10000.0 for family in KNOWN_FAMILIES - {"gemma3"}} | {"gemma3_text": 1_000_000.0}
"""transformers 4's ``rope_theta`` defaults (an attribute there, in the fingerprint)."""
_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")


def _llama_like(c: dict[str, Any]) -> None:
    if c.get("head_dim") is None:
        c["head_dim"] = c["hidden_size"] // c["num_attention_heads"]
    _kv_heads(c)


def _kv_heads(c: dict[str, Any]) -> None:
    if c.get("num_key_value_heads") is None:
        c["num_key_value_heads"] = c["num_attention_heads"]


def _qwen(c: dict[str, Any]) -> None:
    if not c.get("use_sliding_window"):
        c["sliding_window"] = None
    _kv_heads(c)
    if c.get("layer_types") is None:
        window, first = c.get("sliding_window"), c.get("max_window_layers")
        c["layer_types"] = ["sliding_attention" if window is not None and i >= first else "full_attention"
                            for i in range(c["num_hidden_layers"])]


def _alternating(every: int) -> Callable[[dict[str, Any]], None]:
    def finish(c: dict[str, Any]) -> None:
        if c.get("layer_types") is None:
            c["layer_types"] = ["sliding_attention" if (i + 1) % every else "full_attention"
                                for i in range(c["num_hidden_layers"])]
    return finish


def _gemma3_text(c: dict[str, Any]) -> None:
    if c.get("use_bidirectional_attention"):
        c["sliding_window"] = c["sliding_window"] // 2 + 1
    _alternating(int(c.get("sliding_window_pattern", 6)))(c)


_FINISH: dict[str, Callable[[dict[str, Any]], None]] = {
    "llama": _llama_like, "mistral": _llama_like, "qwen2": _qwen, "qwen3": _qwen, "gemma2": _alternating(2),
    "gemma3_text": _gemma3_text, "phi3": _kv_heads,
}
"""What each family's ``__post_init__`` derives from the fields (transformers 5.x)."""


@lru_cache(maxsize=1)
def _transformers_major() -> int:
    """Major version of the installed ``transformers`` (read from its metadata, not imported); 5 if absent."""
    try:
        return int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 5


class JsonConfig:
    """A model config read from JSON: its fields as attributes, the family's defaults filled in.

    Parameters
    ----------
    fields : mapping
        The fields after defaults and derivations (what the attributes answer).
    raw : mapping
        The fields as given (what :meth:`to_transformers` builds the ``transformers`` config from).
    text_config : JsonConfig, optional
        The text decoder's config of a multimodal model.

    """

    def __init__(self, fields: Mapping[str, Any], raw: Mapping[str, Any],
                 text_config: JsonConfig | None = None) -> None:
        self.__dict__.update(fields)
        self._raw = dict(raw)
        self._text = text_config

    def __repr__(self) -> str:
        return f"JsonConfig(model_type={getattr(self, 'model_type', None)!r})"

    def get_text_config(self) -> JsonConfig:
        """The text decoder's config (multimodal models), else this config."""
        return self._text or self

    def to_dict(self) -> dict[str, Any]:
        """The fields as given (before defaults)."""
        return dict(self._raw)

    def to_transformers(self) -> PretrainedConfig:
        """The ``transformers`` config of the same fields (imports transformers, hence torch: seconds)."""
        from transformers import AutoConfig, PretrainedConfig  # only to build a model, never to plan
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        data = dict(self._raw)
        model_type = data.pop("model_type", None)
        if model_type in CONFIG_MAPPING:
            return AutoConfig.for_model(model_type, **data)
        return PretrainedConfig(model_type=model_type or "unknown", **data)


def _fields(data: Mapping[str, Any], family: str | None, where: str) -> dict[str, Any]:
    """``data`` with the family's defaults filled in and derived, and ``rope_theta`` as transformers has it."""
    fields = {**FAMILY_DEFAULTS.get(family or "", {}), **data}
    if family is not None:
        fields["model_type"] = family
    for key in _INT_FIELDS:
        value = fields.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{where}: not a usable model config ({key} = {value!r} is not a whole number)")
    if family in _FINISH:
        try:
            _FINISH[family](fields)
        except (TypeError, ZeroDivisionError) as err:
            raise ValueError(f"{where}: not a usable model config ({err})") from None
    layer_types, layers = fields.get("layer_types"), fields.get("num_hidden_layers")
    if isinstance(layer_types, list) and isinstance(layers, int) and len(layer_types) != layers:
        raise ValueError(f"{where}: not a usable model config ({len(layer_types)} layer_types for {layers} layers)")
    if _transformers_major() >= 5:
        fields.pop("rope_theta", None)  # standardized into rope_parameters
    elif family in _ROPE_THETA_V4:
        fields.setdefault("rope_theta", _ROPE_THETA_V4[family])
    if "torch_dtype" in fields and fields.get("dtype") is None:
        fields["dtype"] = fields["torch_dtype"]
    return fields


def config_from_dict(data: Mapping[str, Any], where: str) -> JsonConfig:
    """Build a :class:`JsonConfig` from config.json fields.

    Parameters
    ----------
    data : mapping
        The fields; ``layer_types_pattern`` (the offline table's shorthand) repeats over the layers.
    where : str
        Where the fields come from, for error messages.

    Returns
    -------
    JsonConfig

    Raises
    ------
    ValueError
        A field the planner reads has an unusable value.

    """
    data = dict(data)
    pattern = data.pop("layer_types_pattern", None)
    if pattern:
        layers = data.get("num_hidden_layers")
        if isinstance(layers, bool) or not isinstance(layers, int):
            raise ValueError(f"{where}: not a usable model config (layer_types_pattern needs num_hidden_layers)")
        data["layer_types"] = [pattern[i % len(pattern)] for i in range(layers)]
    family = data.get("model_type")
    known = family if family in KNOWN_FAMILIES else None
    text = None
    nested = data.get("text_config")
    if known in _TEXT_FAMILY or isinstance(nested, Mapping):
        text_data = dict(nested or {})
        text_family = _TEXT_FAMILY.get(known or "", text_data.get("model_type"))
        text_known = text_family if text_family in KNOWN_FAMILIES else None
        text_fields = _fields(text_data, text_known, f"{where} (text_config)")
        text_fields.setdefault("model_type", text_family or "unknown")
        text = JsonConfig(text_fields, text_data)
    fields = _fields(data, known, where)
    fields.setdefault("model_type", family or "unknown")
    if text is not None:
        fields["text_config"] = text
    return JsonConfig(fields, data, text)


def read_config_file(path: str | Path) -> JsonConfig:
    """Read a ``config.json`` file.

    Raises
    ------
    ValueError
        If the file is not a JSON object or not a usable config; the message names the file.

    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {str(path)!r} as a JSON config ({err}); give the model's config.json") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} is not a JSON object; give the model's config.json")
    return config_from_dict(data, str(path))


def hub_config_dict(repo_id: str) -> dict[str, Any]:
    """The ``config.json`` of a hub repository, from the Hugging Face cache, else downloaded (config only).

    Raises
    ------
    OSError, ValueError
        From ``huggingface_hub`` (offline and not cached, unknown repository, bad repository id).

    """
    from huggingface_hub import hf_hub_download  # here: 0.3 s of imports that only hub ids need

    try:
        file = hf_hub_download(repo_id, "config.json", local_files_only=True)
    except (OSError, ValueError):
        file = hf_hub_download(repo_id, "config.json")
    data = json.loads(Path(file).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"the config.json of {repo_id} is not a JSON object")
    return data


def offline_models() -> dict[str, dict[str, Any]]:
    """The shipped table of popular configs: short name -> ``{"hub_ids": [...], "config": {...}}``."""
    text = resources.files("kvpress_aqua").joinpath("data", "model_configs.json").read_text()
    return json.loads(text)["models"]


def offline_entry(name: str) -> tuple[str, dict[str, Any]] | None:
    """``(short name, config fields)`` of the offline entry named ``name`` (short name or hub id, any case)."""
    key = name.strip().lower()
    for short, entry in offline_models().items():
        if key == short or key in (h.lower() for h in entry["hub_ids"]):
            return short, entry["config"]
    return None

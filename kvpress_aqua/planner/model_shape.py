"""What the planner knows about a model: its shapes and parameter count, from its config alone.

:func:`resolve_model` reads a config (a folder's ``config.json``, a JSON file, the shipped offline
table, the hub) as plain JSON through :mod:`kvpress_aqua.planner.config`, without importing torch or
transformers; a ``transformers`` config object is read as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..model_info import ModelInfo
from ..util.dtypes import canonical_name
from .config import (
    KNOWN_FAMILIES,
    JsonConfig,
    config_from_dict,
    hub_config_dict,
    offline_entry,
    offline_models,
    read_config_file,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["ModelShape", "ParameterParts", "count_parameters", "offline_models", "parameter_parts", "resolve_model"]
_QK_NORM = {"qwen3", "gemma3", "gemma3_text"}
_SANDWICH_NORM = {"gemma2", "gemma3", "gemma3_text"}


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a model, from its config alone.

    Attributes
    ----------
    info : ModelInfo
        Attention shapes (layers, heads, KV heads, head_dim, sliding layers).
    hidden_size, intermediate_size, vocab_size : int
        Residual width, MLP width and vocabulary.
    tie_word_embeddings : bool
        Whether the output head shares the embedding matrix.
    max_position_embeddings : int or None
        The model's context limit, the default context.
    dtype : str or None
        The config's weight dtype, by its canonical name (``"bfloat16"``,
        :func:`kvpress_aqua.util.dtypes.canonical_name`), if it states a known one.
    parameters : int
        Parameter count computed from the shapes.
    source : str
        Where the config came from.
    notes : tuple of str
        Caveats (approximate parameter count, vision tower not counted...).
    source_config : JsonConfig or PretrainedConfig
        The config as read: a :class:`~kvpress_aqua.planner.config.JsonConfig`, or the ``transformers``
        config object given.

    """

    info: ModelInfo
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int | None
    dtype: str | None
    parameters: int
    source: str
    notes: tuple[str, ...] = ()
    source_config: Any = field(default=None, repr=False, compare=False)

    @cached_property
    def config(self) -> PretrainedConfig:
        """The ``transformers`` config (``AutoModelForCausalLM.from_config(shape.config)`` builds the model untrained).

        Built from the JSON fields on first use, which imports transformers (and torch); planning never does.
        """
        if isinstance(self.source_config, JsonConfig):
            return self.source_config.to_transformers()
        return self.source_config


def _hub_config(name: str) -> JsonConfig:
    """The hub repository's ``config.json``: the HF cache first, then the network (config only)."""
    return config_from_dict(hub_config_dict(name), f"hub config of {name}")


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.endswith(".json")


def resolve_model(model: str | Path | PretrainedConfig) -> ModelShape:
    """Read a model's shapes from a config object, a local dir, a config.json, the offline table or the hub.

    Parameters
    ----------
    model : str, Path or PretrainedConfig
        In order of lookup: a directory holding ``config.json``; a path to a config JSON file; a
        short name or hub id of the offline table (:func:`offline_models`); a hub id
        (``owner/name``), whose ``config.json`` is read from the HF cache, else downloaded. A
        ``transformers`` config object (``model.config``) is read as it is.

    Returns
    -------
    ModelShape

    Raises
    ------
    ValueError
        Unknown model (with the accepted forms), unreadable config, or an unsupported family
        (``UnsupportedModelError``: MLA, SSM, recurrent).

    """
    if not isinstance(model, str | Path):
        return _shape(model, getattr(model, "name_or_path", "") or model.model_type, "config object")
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise ValueError(f"model directory {text!r} has no config.json; point --model at the model's folder")
        return _shape(read_config_file(file), text, f"config.json in {text}")
    if path.is_file():
        return _shape(read_config_file(path), text, f"config file {text}")
    if _looks_like_path(text):
        raise ValueError(f"model path {text!r} does not exist; give a model folder, a config.json or a hub id")
    entry = offline_entry(text)
    if entry is not None:
        short, data = entry
        return _shape(config_from_dict(data, f"offline table entry {short!r}"), text, f"offline table entry {short}")
    known = ", ".join(offline_models())
    if "/" not in text:
        raise ValueError(
            f"unknown model {text!r}: not a local folder or config.json and not in the offline table ({known}); "
            "give a hub id (owner/name), a folder with config.json, or one of those names"
        )
    try:
        config = _hub_config(text)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"unknown model {text!r}: not in the offline table and the hub config could not be read ({reason}); "
            "pass --model a folder or config.json, or one of: " + known
        ) from None
    return _shape(config, text, "hub config")


def _dtype_name(config: Any) -> str | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if value is None:
        return None
    try:
        return canonical_name(value)
    except ValueError:
        return None


def _shape(config: Any, name: str, source: str) -> ModelShape:
    try:
        info = ModelInfo.from_config(config, name=name)
        params, notes = count_parameters(config)
    except AttributeError as err:
        raise ValueError(f"the config of {name!r} lacks {err.name!r}, which the planner needs; "
                         "give the model's full config.json") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        notes += ("only the text decoder is counted (vision/audio towers are not)",)
    tied = getattr(config, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(text, "tie_word_embeddings", False)
    max_pos = getattr(text, "max_position_embeddings", None)
    return ModelShape(
        info=info,
        hidden_size=int(text.hidden_size),
        intermediate_size=int(text.intermediate_size),
        vocab_size=int(text.vocab_size),
        tie_word_embeddings=bool(tied),
        max_position_embeddings=int(max_pos) if max_pos else None,
        dtype=_dtype_name(config) or _dtype_name(text),
        parameters=params,
        source=source,
        notes=notes,
        source_config=config,
    )


@dataclass(frozen=True)
class ParameterParts:
    """A decoder's parameters by where a multi-GPU run puts them (:mod:`kvpress_aqua.planner.parallel`).

    Attributes
    ----------
    embeddings, lm_head, final_norm : int
        The input embeddings ``V x h``, an untied output head ``V x h`` (0 when tied) and the final norm ``h``.
    layers : int
        Decoder layers.
    attention_split : int
        A layer's attention parameters that tensor parallelism splits by head: the q/k/v projections
        (columns) with their biases and the output projection (rows).
    mlp_column : int
        A layer's MLP parameters per intermediate channel (``3 h``, plus the gate and up biases): split by
        channel under tensor parallelism.
    layer_replicated : int
        A layer's parameters every tensor-parallel rank holds whole: its norms, per-head q/k norms and the
        biases of the row-split projections.
    mlp_width : int
        Intermediate channels ``I``.
    notes : tuple of str
        Caveats of the count (a family whose layout is assumed to be Llama's).

    """

    embeddings: int
    lm_head: int
    final_norm: int
    layers: int
    attention_split: int
    mlp_column: int
    layer_replicated: int
    mlp_width: int
    notes: tuple[str, ...] = ()

    @property
    def layer(self) -> int:
        """One decoder layer's parameters."""
        return self.attention_split + self.mlp_column * self.mlp_width + self.layer_replicated

    @property
    def total(self) -> int:
        """Every parameter (tied embeddings once)."""
        return self.embeddings + self.lm_head + self.final_norm + self.layers * self.layer


def count_parameters(config: Any) -> tuple[int, tuple[str, ...]]:
    """Parameters of a decoder counted from its config (tied embeddings once).

    Embeddings ``V x h`` (twice unless tied) + final norm ``h`` + per layer: attention
    ``h x (H + 2 H_kv) x d + H x d x h`` (plus q/k/v biases for Qwen2 and every projection's bias
    with ``attention_bias``), gated MLP ``3 x h x I`` (plus biases with ``mlp_bias``), two RMSNorm
    weights ``h`` (four for Gemma-2/3) and per-head q/k norms ``2d`` (Qwen3, Gemma-3).

    Parameters
    ----------
    config : JsonConfig or PretrainedConfig
        The model's config (multimodal configs: their text decoder).

    Returns
    -------
    tuple
        ``(parameters, notes)``; notes say when the family's layout is assumed to be Llama's.

    """
    parts = parameter_parts(config)
    return parts.total, parts.notes


def parameter_parts(config: Any) -> ParameterParts:
    """The parameters of :func:`count_parameters`, by part (:class:`ParameterParts`)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", "unknown")
    h, inter, vocab = int(text.hidden_size), int(text.intermediate_size), int(text.vocab_size)
    heads = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    d = int(getattr(text, "head_dim", None) or h // heads)
    tied = getattr(config, "tie_word_embeddings", None)
    tied = getattr(text, "tie_word_embeddings", False) if tied is None else tied
    attention, replicated = h * (heads + 2 * kv) * d + heads * d * h, 0
    if model_type == "qwen2":
        attention += (heads + 2 * kv) * d
    elif getattr(text, "attention_bias", False):
        attention += (heads + 2 * kv) * d
        replicated += h  # the output projection's bias
    mlp_bias = bool(getattr(text, "mlp_bias", False))
    replicated += h if mlp_bias else 0  # the down projection's bias
    replicated += (4 if model_type in _SANDWICH_NORM else 2) * h + (2 * d if model_type in _QK_NORM else 0)
    notes: tuple[str, ...] = ()
    if model_type not in KNOWN_FAMILIES:
        notes = (f"parameter count assumes a Llama layout (gated MLP, no biases); {model_type!r} may differ",)
    return ParameterParts(embeddings=vocab * h, lm_head=0 if tied else vocab * h, final_norm=h,
                          layers=int(text.num_hidden_layers), attention_split=attention,
                          mlp_column=3 * h + (2 if mlp_bias else 0), layer_replicated=replicated, mlp_width=inter,
                          notes=notes)

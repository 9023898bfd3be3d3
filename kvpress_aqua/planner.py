"""Memory-budget planner: pick the key-channel ratio and the token budget together.

:func:`plan` answers "with this model, this context and this batch, what fits in my memory, and what
do I give up?". For every candidate AQUA ``k_ratio`` it finds the largest token budget that fits,
scores each point with a quality model, and returns the Pareto frontier and a recommendation.
It reads the model's config only, never its weights.

Memory model
------------
With ``B`` sequences, ``L`` layers, ``H`` query heads, ``H_kv`` KV heads of width ``d``, hidden size
``h``, MLP width ``I``, vocabulary ``V``, element size ``e`` bytes, ``d_k`` stored key channels and a
token budget ``b``::

    total = weights + projections + overhead + max(prefill peak, decode peak)

- ``weights = parameters x e``: parameters counted from the config's shapes (embeddings, attention,
  gated MLP, norms, biases where the family has them), tied embeddings counted once.
- ``projections = L x H_kv x d x d x e``: AQUA's matrices, held in the model dtype (0 without AQUA);
  ``d x d_k`` per head when AQUA keeps no exact tokens. With AQUA every layer also holds its exact
  tokens' dropped channels and slots, ``B x H_kv x E x ((d - d_k) x e + 8)`` (``E = exact_sinks +
  exact_recent``).
- ``overhead``: :data:`DEFAULT_OVERHEAD` (512 MiB: interpreter, framework runtime, CUDA context,
  allocator slack) unless given.
- a phase peak is ``KV held + attention + activations + copy``, where attention and activations are
  those of the larger of a decoder layer's two steps (their tensors never coexist):

  * attention step: ``scores + B x n x (HIDDEN_COPIES x h + 2 x H x d + 2 x H_kv x d) x e`` (residual
    stream copies: the embeddings, the layer input, the residual and the normed input; queries and
    attention output; keys and values). ``scores``, the *attention* term: in the cache's attention
    function :data:`ATTENTION_COPIES` float32 tensors of ``B x H x n x (held + n)`` (``held``
    includes the chunk's own slots: past block and new block, masked copies, concatenation,
    softmax). A plain ``DynamicCache`` keeps the model's fused SDPA (no score matrix): 0 when it
    runs with ``is_causal`` (the first chunk, decode steps); a chunk after the first gets a boolean
    mask, ``B x n x held`` bytes, and under GQA/MQA SDPA then expands K and V to every query head,
    ``2 x B x H x held x d x e``.
  * MLP step: ``B x n x (HIDDEN_COPIES x h + MLP_COPIES x I) x e`` (the residual stream copies; gate
    activation, up, their product); the attention term is then 0.

  Both add the last token's logits ``B x V x (e + 4)`` (model dtype and the float32 copy ``generate``
  makes) to the activations.
  * copy: one layer's KV at its attention-visible slots, held twice while ``torch.cat``/``gather``
    builds the layer's new tensors.

  With ``new_tokens >= 2`` the decode peak uses ``n = 1`` and the decode slots; otherwise only the
  prefill peak counts. ``n`` is ``prefill_chunk`` (prefill through ``CompressedCache.prefill``) or the
  whole context.

The KV bytes the plan reports (``Breakdown.cache_bytes``: KV held at the end plus projections) are
what ``CompressedCache.nbytes()`` measures after prefilling ``context`` tokens and feeding
``new_tokens - 1`` decode tokens (the last generated token is never fed back). The working-set
constants are estimates (``benchmarks/plan_rss.py`` measures them); the KV bytes are exact.

Quality model
-------------
Scores are an *estimate* of the fraction of the uncompressed model's quality kept, ``1`` meaning no
loss, always reported with their source (:attr:`QualityModel.source`, :attr:`QualityModel.kind`):

1. a calibration sweep stored beside the AQUA artifact (``<artifact stem>.sweep.json``, written by
   ``kvtool calibrate --sweep``, :mod:`kvpress_aqua.sweep`): ``ppl_full / ppl`` measured on held-out
   text at a grid of ``k_ratio`` x ``retained`` (fraction of tokens kept), used when it was measured
   with that artifact and the plan's token policy; interpolated bilinearly, linearly down to 0 at 0
   below the smallest measured ``k_ratio`` or ``retained``, clamped above the largest, capped at 1;
2. else ``q_channels x q_tokens``, where ``q_channels = exp(-ENERGY_BETA x (1 - E)^ENERGY_GAMMA)`` of
   the key energy ``E`` kept by ``k_ratio``: from the artifact's SVD spectrum when one exists, else
   from :data:`DEFAULT_ENERGY` (the mean energy curve measured on SmolLM2-135M). ``ENERGY_BETA`` and
   ``ENERGY_GAMMA`` fit that prototype's perplexity ratios (energy 0.97, 0.93, 0.84 gave
   ppl_dense/ppl 0.96, 0.61, 0.02). ``q_tokens = 1 - (1 - retained)^RETENTION_EXPONENT[policy]``.

Option 2 is a heuristic, not a measurement: the channel and token losses are assumed independent,
and the token term is not fitted to any model.
"""

from __future__ import annotations

import importlib
import json
import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .accounting import (
    EXACT_SLOT_BYTES,
    INDEX_BYTES,
    SCORE_BYTES,
    START_BYTES,
    VALID_BYTES,
    decode_slots,
    dense_layer_tokens,
    dtype_bytes,
    layer_nbytes,
)
from .model_info import ModelInfo
from .policies.aqua import Aqua
from .sizes import format_bytes, parse_size, parse_tokens
from .spec import DEFAULT_SINKS, PolicySpec
from .sweep import find_sweep, token_entry

__all__ = [
    "Breakdown",
    "Candidate",
    "MemoryModel",
    "ModelShape",
    "Plan",
    "QualityModel",
    "candidate_key_dims",
    "count_parameters",
    "offline_models",
    "plan",
    "resolve_model",
]

DEFAULT_OVERHEAD = 512 * 2**20
"""Runtime overhead charged when none is given: interpreter, framework, CUDA context, allocator slack."""
ATTENTION_COPIES = 4
"""Float32 score-sized tensors alive at once in the cache's attention (raw, masked, concatenated, softmax)."""
HIDDEN_COPIES = 4
"""Hidden-size activations alive per token in a decoder layer (embeddings, layer input, residual, normed input)."""
MLP_COPIES = 3
"""MLP-width activations alive per token at the MLP step (gate activation, up, their product)."""
MIN_K_RATIO = 0.25
"""Smallest ``k_ratio`` considered: below a quarter of the channels the prototype's perplexity exploded."""
DEFAULT_MIN_TOKENS = 64
"""A plan keeping fewer tokens per sequence than this is treated as not fitting."""
RETENTION_EXPONENT = {"h2o": 8.0, "sliding": 4.0}
"""``q_tokens = 1 - (1 - retained)^x``: H2O keeps 90% at a quarter of the tokens, a sliding window 68%."""
ENERGY_BETA = 600.0
ENERGY_GAMMA = 2.7
DEFAULT_ENERGY: tuple[tuple[float, float], ...] = (
    (0.0, 0.0), (0.25, 0.84), (0.375, 0.89), (0.5, 0.93), (0.75, 0.97), (1.0, 1.0),
)
"""Mean key energy kept vs ``k_ratio`` measured on SmolLM2-135M (head_dim 64); the default curve."""

_TOKEN_POLICIES = ("h2o", "sliding")
_CHUNK_HINTS = (8192, 4096, 2048, 1024, 512, 256, 128)
_SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8"}
# Families whose parameter layout count_parameters knows exactly.
_KNOWN_LAYOUTS = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3"}
_QK_NORM = {"qwen3", "gemma3", "gemma3_text"}
_SANDWICH_NORM = {"gemma2", "gemma3", "gemma3_text"}


# ------------------------------------------------------------------------------------------ model
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
        The config's weight dtype name (``"bfloat16"``), if it states one.
    parameters : int
        Parameter count computed from the shapes.
    source : str
        Where the config came from.
    notes : tuple of str
        Caveats (approximate parameter count, vision tower not counted...).
    config : PretrainedConfig
        The config itself (``AutoModelForCausalLM.from_config(shape.config)`` builds the model untrained).

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
    config: PretrainedConfig | None = field(default=None, repr=False, compare=False)


def offline_models() -> dict[str, dict[str, Any]]:
    """The shipped table of popular configs: short name -> ``{"hub_ids": [...], "config": {...}}``."""
    text = resources.files("kvpress_aqua").joinpath("data", "model_configs.json").read_text()
    return json.loads(text)["models"]


def _offline_entry(name: str) -> tuple[str, dict[str, Any]] | None:
    key = name.strip().lower()
    for short, entry in offline_models().items():
        if key == short or key in (h.lower() for h in entry["hub_ids"]):
            return short, entry["config"]
    return None


def _config_from_dict(data: dict[str, Any], where: str) -> PretrainedConfig:
    data = dict(data)
    pattern = data.pop("layer_types_pattern", None)
    if pattern:
        layers = int(data["num_hidden_layers"])
        data["layer_types"] = [pattern[i % len(pattern)] for i in range(layers)]
    model_type = data.pop("model_type", None)
    try:
        if model_type in CONFIG_MAPPING:
            return AutoConfig.for_model(model_type, **data)
        return PretrainedConfig(model_type=model_type or "unknown", **data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: not a usable model config ({err})") from None


def _hub_config(name: str) -> PretrainedConfig:
    """``AutoConfig.from_pretrained``: the HF cache first, then the network (config only)."""
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        return AutoConfig.from_pretrained(name)


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.endswith(".json")


def resolve_model(model: str | Path | PretrainedConfig) -> ModelShape:
    """Read a model's shapes from a config object, a local dir, a config.json, the offline table or the hub.

    Parameters
    ----------
    model : str, Path or PretrainedConfig
        In order of lookup: a directory holding ``config.json``; a path to a config JSON file; a
        short name or hub id of the offline table (:func:`offline_models`); a hub id
        (``owner/name``), through ``AutoConfig.from_pretrained`` (HF cache, then network).

    Returns
    -------
    ModelShape

    Raises
    ------
    ValueError
        Unknown model (with the accepted forms), unreadable config, or an unsupported family
        (``UnsupportedModelError``: MLA, SSM, recurrent).

    """
    if isinstance(model, PretrainedConfig):
        return _shape(model, getattr(model, "name_or_path", "") or model.model_type, "config object")
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise ValueError(f"model directory {text!r} has no config.json; point --model at the model's folder")
        return _shape(_read_config(file), text, f"config.json in {text}")
    if path.is_file():
        return _shape(_read_config(path), text, f"config file {text}")
    if _looks_like_path(text):
        raise ValueError(f"model path {text!r} does not exist; give a model folder, a config.json or a hub id")
    entry = _offline_entry(text)
    if entry is not None:
        short, data = entry
        return _shape(_config_from_dict(data, f"offline table entry {short!r}"), text, f"offline table entry {short}")
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


def _read_config(path: Path) -> PretrainedConfig:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {str(path)!r} as a JSON config ({err}); give the model's config.json") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} is not a JSON object; give the model's config.json")
    return _config_from_dict(data, str(path))


def _dtype_name(config: PretrainedConfig) -> str | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    return name if name.lower() in _SHORT_DTYPE else None


def _shape(config: PretrainedConfig, name: str, source: str) -> ModelShape:
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
        config=config,
    )


def count_parameters(config: PretrainedConfig) -> tuple[int, tuple[str, ...]]:
    """Parameters of a decoder counted from its config (tied embeddings once).

    Embeddings ``V x h`` (twice unless tied) + final norm ``h`` + per layer: attention
    ``h x (H + 2 H_kv) x d + H x d x h`` (plus q/k/v biases for Qwen2 and every projection's bias
    with ``attention_bias``), gated MLP ``3 x h x I`` (plus biases with ``mlp_bias``), two RMSNorm
    weights ``h`` (four for Gemma-2/3) and per-head q/k norms ``2d`` (Qwen3, Gemma-3).

    Parameters
    ----------
    config : PretrainedConfig
        The model's config (multimodal configs: their text decoder).

    Returns
    -------
    tuple
        ``(parameters, notes)``; notes say when the family's layout is assumed to be Llama's.

    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", "unknown")
    h, inter, vocab = int(text.hidden_size), int(text.intermediate_size), int(text.vocab_size)
    heads = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    d = int(getattr(text, "head_dim", None) or h // heads)
    tied = getattr(config, "tie_word_embeddings", None)
    tied = getattr(text, "tie_word_embeddings", False) if tied is None else tied
    attention = h * (heads + 2 * kv) * d + heads * d * h
    if model_type == "qwen2":
        attention += (heads + 2 * kv) * d
    elif getattr(text, "attention_bias", False):
        attention += (heads + 2 * kv) * d + h
    mlp = 3 * h * inter + ((2 * inter + h) if getattr(text, "mlp_bias", False) else 0)
    norms = (4 if model_type in _SANDWICH_NORM else 2) * h + (2 * d if model_type in _QK_NORM else 0)
    total = vocab * h * (1 if tied else 2) + h + int(text.num_hidden_layers) * (attention + mlp + norms)
    notes: tuple[str, ...] = ()
    if model_type not in _KNOWN_LAYOUTS:
        notes = (f"parameter count assumes a Llama layout (gated MLP, no biases); {model_type!r} may differ",)
    return total, notes


# ----------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class Term:
    """One line of the memory formula: symbols, the numbers substituted, and the bytes."""

    name: str
    formula: str
    numbers: str
    nbytes: int


@dataclass(frozen=True)
class Breakdown:
    """Predicted bytes of one plan point.

    Attributes
    ----------
    weights, projections, overhead : int
        Model weights, AQUA projection matrices, runtime overhead.
    kv : int
        KV held at the end (keys, values, slot metadata): ``cache.nbytes() - projections``.
    peak_kv, attention, activations, copy : int
        KV held, attention scores (0 when a layer's MLP step needs more than its attention step),
        activations and one layer's copy in the peak phase.
    peak_phase : str
        ``"prefill"`` or ``"decode"``.
    terms : tuple of Term
        The formula with numbers substituted (:meth:`Plan.explain`).

    """

    weights: int
    kv: int
    projections: int
    peak_kv: int
    attention: int
    activations: int
    copy: int
    overhead: int
    peak_phase: str
    terms: tuple[Term, ...] = field(repr=False)

    @property
    def cache_bytes(self) -> int:
        """What ``CompressedCache.nbytes()`` measures at the end: KV plus projection matrices."""
        return self.kv + self.projections

    @property
    def working_set(self) -> int:
        """Transient bytes of the peak phase: attention scores, activations, the layer copy."""
        return self.attention + self.activations + self.copy

    @property
    def total(self) -> int:
        """Peak bytes: weights + projections + overhead + KV held and working set at the peak."""
        return self.weights + self.projections + self.overhead + self.peak_kv + self.working_set


@dataclass(frozen=True)
class _Phase:
    name: str
    chunk: int
    offset: int
    slots: tuple[int, ...]
    visible: tuple[int, ...]
    kv: int
    attention: int
    activations: int
    copy: int
    step: str
    scores: int

    @property
    def peak(self) -> int:
        return self.kv + self.attention + self.activations + self.copy


@dataclass(frozen=True)
class MemoryModel:
    """Bytes of a run (model, batch, context, new tokens, dtype, chunking) for any key width and budget.

    Parameters
    ----------
    shape : ModelShape
        The model.
    batch, context, new_tokens : int
        Sequences, prompt tokens, generated tokens.
    dtype : str
        Weight/KV dtype name (``bf16``...).
    prefill_chunk : int or None
        Prefill chunk (``CompressedCache.prefill``); ``None`` runs the prompt in one forward.
    overhead : int
        Runtime overhead in bytes.
    token_policy : {"h2o", "sliding"}
        The eviction policy (H2O keeps a float32 score per slot).
    exact_tokens : int
        AQUA's exact tokens per sequence and KV head (``exact_sinks + exact_recent``, by default
        ``Aqua``'s): with AQUA each layer also holds their ``head_dim - key_dim`` dropped channels.

    """

    shape: ModelShape
    batch: int
    context: int
    new_tokens: int
    dtype: str
    prefill_chunk: int | None
    overhead: int
    token_policy: str = "h2o"
    exact_tokens: int = Aqua.exact_sinks + Aqua.exact_recent

    @property
    def elem(self) -> int:
        """Bytes per weight/KV element."""
        return dtype_bytes(self.dtype)

    @property
    def seen(self) -> int:
        """Tokens fed through the cache by the end: the prompt and ``new_tokens - 1`` decode steps."""
        return self.context + max(self.new_tokens - 1, 0)

    @property
    def windows(self) -> tuple[int | None, ...]:
        """The model's own sliding window per layer (``None`` on full-attention layers)."""
        info = self.shape.info
        return tuple(info.sliding_window if info.is_sliding(i) else None for i in range(info.num_layers))

    def _chunks(self) -> list[tuple[int, int]]:
        """``(offset, tokens)`` of the prefill chunks that can hold the most: the last, and the last full one."""
        chunk = min(self.prefill_chunk or self.context, self.context)
        last_n = self.context - chunk * ((self.context - 1) // chunk)
        last_lo = self.context - last_n
        chunks = [(last_lo, last_n)]
        if last_n < chunk and last_lo >= chunk:
            chunks.append((last_lo - chunk, chunk))
        return chunks

    def evaluate(self, key_dim: int, budget: int | None) -> Breakdown:
        """Predict the bytes of a cache storing ``key_dim`` key channels with token ``budget``.

        Parameters
        ----------
        key_dim : int
            Stored key channels (``head_dim``: no AQUA).
        budget : int or None
            Token budget per layer, KV head and sequence; ``None`` keeps every token. With neither
            a budget nor AQUA the cache is a plain ``DynamicCache``.

        Returns
        -------
        Breakdown

        """
        info, e, batch = self.shape.info, self.elem, self.batch
        d = info.head_dim
        compressed = budget is not None or key_dim < d
        scores = budget is not None and self.token_policy == "h2o"

        def layer(slots: int) -> int:
            return layer_nbytes(batch, info.num_kv_heads, slots, key_dim, d, e, compressed=compressed,
                                needs_scores=scores, exact_tokens=self.exact_tokens, residual_dim=d - key_dim)

        def cap(window: int | None) -> int | None:
            limits = [x for x in (budget, None if window is None else window - 1) if x is not None]
            return min(limits) if limits else None

        def visible(lo: int, n: int, window: int | None) -> int:
            limit = cap(window)
            return (lo if limit is None else min(lo, limit)) + n

        def stored(lo: int, n: int, window: int | None) -> int:
            return visible(lo, n, window) if compressed else dense_layer_tokens(lo + n, window)

        phases = []
        for lo, n in self._chunks():
            slots = tuple(stored(lo, n, w) for w in self.windows)
            seen_slots = tuple(visible(lo, n, w) for w in self.windows)
            phases.append(self._phase("prefill", lo, n, slots, seen_slots, layer, compressed))
        end = phases[0]
        if self.new_tokens >= 2:
            slots = tuple(
                decode_slots(budget, self.seen, w) if compressed else dense_layer_tokens(self.seen, w)
                for w in self.windows
            )
            end = self._phase("decode", self.seen - 1, 1, slots, slots, layer, compressed)
            phases.append(end)
        peak = max(phases, key=lambda p: p.peak)
        columns = d if self.exact_tokens else key_dim  # exact tokens need the dropped columns of P as well
        projections = info.num_layers * info.num_kv_heads * d * columns * e if key_dim < d else 0
        weights = self.shape.parameters * e
        return Breakdown(
            weights=weights,
            kv=end.kv,
            projections=projections,
            peak_kv=peak.kv,
            attention=peak.attention,
            activations=peak.activations,
            copy=peak.copy,
            overhead=self.overhead,
            peak_phase=peak.name,
            terms=self._terms(key_dim, compressed, scores, weights, projections, columns, end, peak),
        )

    def _per_token(self) -> tuple[int, int]:
        """Activation elements per token alive at a layer's attention step and at its MLP step."""
        s, info = self.shape, self.shape.info
        hidden = HIDDEN_COPIES * s.hidden_size
        return (hidden + 2 * info.num_heads * info.head_dim + 2 * info.num_kv_heads * info.head_dim,
                hidden + MLP_COPIES * s.intermediate_size)

    def _phase(self, name: str, lo: int, n: int, slots: Sequence[int], visible: Sequence[int], layer: Any,
               compressed: bool) -> _Phase:
        info, b, e = self.shape.info, self.batch, self.elem
        held = max(visible)
        if compressed:
            scores = ATTENTION_COPIES * b * info.num_heads * n * (held + n) * 4
        else:
            scores = b * n * held if _sdpa_masked(name, lo) else 0
            if _sdpa_masked(name, lo) and info.group_size > 1:
                scores += 2 * b * info.num_heads * held * info.head_dim * e
        at_attention, at_mlp = self._per_token()
        attention_step, mlp_step = scores + b * n * at_attention * e, b * n * at_mlp * e
        step = "attention" if attention_step >= mlp_step else "mlp"
        logits = b * self.shape.vocab_size * (e + 4)
        return _Phase(
            name=name, chunk=n, offset=lo, slots=tuple(slots), visible=tuple(visible),
            kv=sum(layer(x) for x in slots),
            attention=scores if step == "attention" else 0,
            activations=b * n * (at_attention if step == "attention" else at_mlp) * e + logits,
            copy=max(layer(x) for x in visible),
            step=step, scores=scores,
        )

    def _kv_text(self, slots: Sequence[int], key_dim: int, compressed: bool, scores: bool) -> str:
        info, e, b = self.shape.info, self.elem, self.batch
        meta = INDEX_BYTES + VALID_BYTES + (SCORE_BYTES if scores else 0)
        widths = f"({key_dim} + {info.head_dim})·{e}"
        per_slot = f"({widths} + {meta})" if compressed else widths
        groups: dict[int, int] = {}
        for x in slots:
            groups[x] = groups.get(x, 0) + 1
        parts = [f"{count} × {b}·{info.num_kv_heads}·{x:,}·{per_slot}" for x, count in sorted(groups.items())]
        if key_dim < info.head_dim and self.exact_tokens:
            parts.append(f"{len(slots)} × {b}·{info.num_kv_heads}·{self.exact_tokens}·"
                         f"({info.head_dim - key_dim}·{e} + {EXACT_SLOT_BYTES})")
        if compressed:
            parts.append(f"{len(slots)} × {b}·{START_BYTES}")
        return " + ".join(parts)

    def _terms(self, key_dim: int, compressed: bool, scores: bool, weights: int, projections: int, columns: int,
               end: _Phase, peak: _Phase) -> tuple[Term, ...]:
        s, info, e, b = self.shape, self.shape.info, self.elem, self.batch
        meta = "4 + 1 + 4 (index, valid, H2O score)" if scores else "4 + 1 (index, valid)"
        exact = (" + B·H_kv·E·((d - d_k)·e + 8) (AQUA's exact tokens and their slots)"
                 if key_dim < info.head_dim and self.exact_tokens else "")
        kv_formula = (f"Σ layers B·H_kv·slots·((d_k + d_v)·e + {meta}){exact} + B·4" if compressed
                      else "Σ layers B·H_kv·tokens·(d_k + d_v)·e  (DynamicCache)")
        where = f"{peak.name} of {peak.chunk:,} token(s) at offset {peak.offset:,}"
        held, n = max(peak.visible), peak.chunk
        if compressed:
            attention = [f"{ATTENTION_COPIES}·B·H·n·(held + n)·4 (float32 scores in the cache's attention)",
                         f"{ATTENTION_COPIES}·{b}·{info.num_heads}·{n:,}·({held:,} + {n:,})·4"]
        elif peak.scores and info.group_size > 1:
            attention = ["B·n·held + 2·B·H·held·d·e (SDPA's boolean mask; with a mask it expands K and V to every "
                         "query head; no score matrix)", f"{b}·{n:,}·{held:,} + 2·{b}·{info.num_heads}·{held:,}·"
                         f"{info.head_dim}·{e}"]
        elif peak.scores:
            attention = ["B·n·held (SDPA's boolean mask; no score matrix)", f"{b}·{n:,}·{held:,}"]
        else:
            attention = ["0 (the model's fused SDPA with is_causal: no mask, no score matrix, no K/V expansion)", "0"]
        at_attention, at_mlp = self._per_token()
        attention_sym = f"B·n·({HIDDEN_COPIES}h + 2H·d + 2H_kv·d)·e"
        attention_num = (f"{b}·{n:,}·({HIDDEN_COPIES}·{s.hidden_size} + 2·{info.num_heads}·{info.head_dim} + "
                         f"2·{info.num_kv_heads}·{info.head_dim})·{e}")
        mlp_sym = f"B·n·({HIDDEN_COPIES}h + {MLP_COPIES}I)·e"
        mlp_num = f"{b}·{n:,}·({HIDDEN_COPIES}·{s.hidden_size} + {MLP_COPIES}·{s.intermediate_size})·{e}"
        logits_sym, logits_num = "B·V·(e + 4)", f"{b}·{s.vocab_size:,}·({e} + 4)"
        if peak.step == "attention":
            other = b * n * at_mlp * e
            activations = (f"{attention_sym} + {logits_sym} (attention step; the MLP step, {mlp_sym} = "
                           f"{other:,} B, needs less)", f"{attention_num} + {logits_num}")
        else:
            other = peak.scores + b * n * at_attention * e
            activations = (f"{mlp_sym} + {logits_sym} (MLP step; the attention step, attention + {attention_sym} = "
                           f"{other:,} B, needs less)", f"{mlp_num} + {logits_num}")
            if peak.scores:
                attention = [f"0 at the peak (MLP step); at the attention step {attention[0]}: {attention[1]} = "
                             f"{peak.scores:,} B", "0"]
        terms = [
            Term("weights", "parameters·e", f"{s.parameters:,}·{e}", weights),
            Term(f"KV at the end ({end.name})", kv_formula, self._kv_text(end.slots, key_dim, compressed, scores),
                 end.kv),
            Term("AQUA projections", "L·H_kv·d·d·e (exact tokens need every column of P), else L·H_kv·d·d_k·e",
                 f"{info.num_layers}·{info.num_kv_heads}·{info.head_dim}·{columns}·{e}" if projections else "no AQUA",
                 projections),
            Term(f"KV held at the peak ({where})", kv_formula,
                 self._kv_text(peak.slots, key_dim, compressed, scores), peak.kv),
            Term("attention", *attention, peak.attention),
            Term("activations", *activations, peak.activations),
            Term("layer copy", "one layer's KV at its visible slots (torch.cat/gather)",
                 self._kv_text((max(peak.visible),), key_dim, compressed, scores), peak.copy),
            Term("overhead", "runtime constant (default DEFAULT_OVERHEAD = 512 MiB, --overhead)",
                 f"{self.overhead:,}", self.overhead),
        ]
        return tuple(terms)


def _sdpa_masked(phase: str, offset: int) -> bool:
    """Whether ``transformers``' SDPA path builds an explicit boolean mask (``B x n x held`` bytes).

    It does for a prefill chunk after the first (its keys are longer than its queries); the first
    chunk and decode steps run with ``is_causal`` and no mask. With a mask, under GQA/MQA, it also
    expands K and V to every query head (``repeat_kv``).
    """
    return phase == "prefill" and offset > 0


# ---------------------------------------------------------------------------------------- quality
def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Piecewise-linear interpolation, clamped at the ends (``xs`` sorted)."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect_left(xs, x)
    t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[i - 1] + t * (ys[i] - ys[i - 1])


@dataclass(frozen=True)
class QualityModel:
    """Estimated fraction of the dense model's quality kept at a ``k_ratio`` and a token retention.

    Build one with :meth:`default`, :meth:`from_spectrum`, :meth:`from_sweep` or
    :meth:`from_artifact`; pass it to :func:`plan` as ``quality=`` to plug in any source.

    Attributes
    ----------
    source : str
        Where the numbers come from; every plan reports it.
    kind : {"sweep", "spectrum", "default"}
        Which of the three sources it is: measured points, or the heuristic from an artifact's SVD
        spectrum or from the default energy curve.
    energy : tuple of (k_ratio, energy)
        Key energy kept vs ``k_ratio`` (used without a sweep).
    sweep : tuple of (k_ratio, retained, quality)
        Measured points; when present they are used alone.

    """

    source: str
    kind: str = "default"
    energy: tuple[tuple[float, float], ...] = DEFAULT_ENERGY
    sweep: tuple[tuple[float, float, float], ...] = ()

    @classmethod
    def default(cls, why: str = "") -> QualityModel:
        """The documented default curve (no AQUA artifact for this model); ``why`` is appended to the source."""
        return cls("default heuristic: SmolLM2-135M key-energy curve and a token-retention curve (not measured "
                   "on this model)" + (f"; {why}" if why else ""))

    @classmethod
    def from_spectrum(cls, spectrum: torch.Tensor, source: str, why: str = "") -> QualityModel:
        """Energy curve from SVD singular values ``(layers, kv_heads, head_dim)``, sorted descending.

        The energy kept by ``r`` channels is ``sum(s[:r]^2) / sum(s^2)``, averaged over layers and KV
        heads; ``why`` (e.g. why no sweep is used) is appended to the source.
        """
        if spectrum.ndim != 3:
            raise ValueError(f"spectrum must be (layers, kv_heads, head_dim), got shape {tuple(spectrum.shape)}")
        power = spectrum.double().pow(2)
        kept = (power.cumsum(-1) / power.sum(-1, keepdim=True)).mean((0, 1))
        d = kept.shape[0]
        curve = ((0.0, 0.0),) + tuple(((r + 1) / d, float(kept[r])) for r in range(d))
        text = f"heuristic from the SVD spectrum energy of {source} and a token-retention curve"
        return cls(text + (f"; {why}" if why else ""), kind="spectrum", energy=curve)

    @classmethod
    def from_sweep(cls, rows: Iterable[Mapping[str, float]], source: str) -> QualityModel:
        """Measured points: mappings with ``k_ratio``, ``retained`` (fraction of tokens kept) and ``quality``."""
        try:
            points = tuple(sorted((float(r["k_ratio"]), float(r["retained"]), float(r["quality"])) for r in rows))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"calibration sweep of {source}: rows need k_ratio, retained, quality ({err})") from None
        if not points:
            raise ValueError(f"calibration sweep of {source} is empty")
        return cls(f"calibration sweep {source} (measured, interpolated)", kind="sweep", sweep=points)

    @classmethod
    def from_artifact(cls, artifact: Any, where: str, token_policy: str = "h2o") -> QualityModel:
        """The calibration sweep stored beside the artifact if it matches, else its ``spectrum``, else the default.

        The sweep is the file :func:`kvpress_aqua.sweep.sweep_path` names, used when it was measured
        with this artifact and ``token_policy`` (:func:`kvpress_aqua.sweep.find_sweep`); otherwise the
        source says why it was not used.
        """
        found, why = find_sweep(artifact, token_policy)
        if found is not None:
            meta = found.metadata
            return cls.from_sweep(found.rows(), f"{found.path} ({len(found.points)} points, {meta.get('tokens')} "
                                                f"tokens of {meta.get('text_source')}, {token_policy})")
        spectrum = getattr(artifact, "spectrum", None)
        if spectrum is not None:
            return cls.from_spectrum(torch.as_tensor(spectrum), where, why)
        return cls.default(why)

    def channel_energy(self, k_ratio: float) -> float:
        """Key energy kept by storing ``k_ratio`` of the channels."""
        return _interp(k_ratio, [k for k, _ in self.energy], [v for _, v in self.energy])

    def __call__(self, k_ratio: float, retained: float, token_policy: str = "h2o") -> float:
        """Estimated quality in ``[0, 1]`` (1: same as the dense model)."""
        if self.sweep:
            return self._from_sweep(k_ratio, retained)
        channels = math.exp(-ENERGY_BETA * max(0.0, 1.0 - self.channel_energy(k_ratio)) ** ENERGY_GAMMA)
        tokens = 1.0 - (1.0 - min(1.0, retained)) ** RETENTION_EXPONENT[token_policy]
        return channels * tokens

    def _from_sweep(self, k_ratio: float, retained: float) -> float:
        """Bilinear in the measured grid; linear to 0 at 0 below the smallest measured value; clamped above."""
        ratios = sorted({k for k, _, _ in self.sweep})

        def at(k: float) -> float:
            pts = [(r, q) for kk, r, q in self.sweep if kk == k]
            return _interp(retained, *_from_zero([r for r, _ in pts], [q for _, q in pts]))

        value = _interp(k_ratio, *_from_zero(ratios, [at(k) for k in ratios]))
        return min(1.0, max(0.0, value))


def _from_zero(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """Measured points with ``(0, 0)`` added in front when the smallest ``x`` is above 0 (pessimistic extension)."""
    return ([0.0, *xs], [0.0, *ys]) if xs[0] > 0 else (xs, ys)


def _find_quality(info: ModelInfo, artifact: str | Path | None, token_policy: str) -> QualityModel:
    """The quality model from an AQUA artifact (given, or found by ``kvpress_aqua.calibration``), else the default."""
    calibration = importlib.import_module(f"{__package__}.calibration")  # looked up at call time (tests replace it)
    if artifact is not None:
        return QualityModel.from_artifact(calibration.AquaArtifact.load(artifact), f"artifact {artifact}",
                                          token_policy)
    try:
        found = calibration.find_artifact(info)
    except FileNotFoundError:
        return QualityModel.default("no AQUA artifact for this model (`kvtool calibrate --sweep` makes one and "
                                    "measures the sweep)")
    return QualityModel.from_artifact(found, f"AQUA artifact {found.path}", token_policy)


# ------------------------------------------------------------------------------------------- plan
def candidate_key_dims(head_dim: int) -> list[int]:
    """Stored key widths considered, widest first.

    Multiples of 8 (16 for ``head_dim >= 128``) from ``MIN_K_RATIO * head_dim`` up to ``head_dim``:
    ``64 -> 64, 56, ..., 16`` (k_ratio 1 to 0.25), ``128 -> 128, 112, ..., 32``.
    """
    step = 16 if head_dim >= 128 else 8
    low = math.ceil(head_dim * MIN_K_RATIO)
    dims = {c for c in range(step, head_dim + 1, step) if c >= low} | {head_dim}
    return sorted(dims, reverse=True)


@dataclass(frozen=True)
class Candidate:
    """One plan point: a key width with the largest token budget that fits (or the smallest considered).

    Attributes
    ----------
    k_ratio : float
        ``key_dim / head_dim``; 1 means no AQUA.
    key_dim : int
        Stored key channels.
    token_budget : int or None
        Tokens kept per layer, KV head and sequence; ``None`` keeps every token.
    retained : float
        Fraction of the tokens seen that the budget keeps.
    memory : Breakdown
        Predicted bytes.
    quality : float
        Estimated quality (see :class:`QualityModel`).
    fits : bool
        Whether ``memory.total`` fits the budget.
    verdict : str
        ``recommended``, ``fits`` or ``does not fit`` (``frontier`` for :attr:`Plan.frontier` points).
    entries : tuple of dict
        The policy stack as :class:`~kvpress_aqua.spec.PolicySpec` entries.

    """

    k_ratio: float
    key_dim: int
    token_budget: int | None
    retained: float
    memory: Breakdown
    quality: float
    fits: bool
    verdict: str
    entries: tuple[dict[str, Any], ...]

    def label(self, seen: int) -> str:
        """Short human label: ``"k 0.5, 1,024 tokens"``."""
        tokens = f"all {seen:,} tokens" if self.token_budget is None else f"{self.token_budget:,} tokens"
        return f"k_ratio {self.k_ratio:g} ({self.key_dim} key channels), {tokens}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        m = self.memory
        return {
            "k_ratio": self.k_ratio, "key_dim": self.key_dim, "token_budget": self.token_budget,
            "retained": self.retained, "quality": self.quality, "fits": self.fits, "verdict": self.verdict,
            "cache_bytes": m.cache_bytes, "kv_bytes": m.kv, "projection_bytes": m.projections,
            "weights_bytes": m.weights, "peak_kv_bytes": m.peak_kv, "attention_bytes": m.attention,
            "activation_bytes": m.activations, "copy_bytes": m.copy, "overhead_bytes": m.overhead,
            "peak_phase": m.peak_phase, "total_bytes": m.total, "policies": [dict(e) for e in self.entries],
        }


@dataclass(frozen=True)
class Plan:
    """The planner's answer; rich-friendly fields, :meth:`to_dict`, :meth:`to_toml`, :meth:`explain`.

    Attributes
    ----------
    budget : int
        Memory budget in bytes.
    model : ModelShape
        The model planned for.
    memory_model : MemoryModel
        The run (batch, context, dtype...) and its byte formulas.
    quality_source : str
        Where the quality estimates come from.
    candidates : tuple of Candidate
        One per key width, widest first.
    frontier : tuple of Candidate
        The memory-quality Pareto frontier, cheapest first: fitting points (any key width, token
        budgets from ``min_tokens`` up to each width's largest) that no other point beats on both
        total bytes and quality.
    recommendation : Candidate or None
        The best estimated quality that fits (ties: fewer bytes); ``None`` when nothing fits.
    message : str
        One-paragraph verdict, with the "does not fit: needs X, you have Y" analysis when nothing fits.
    notes : tuple of str
        Caveats (context beyond the model's limit, approximate parameter count...).

    """

    budget: int
    model: ModelShape
    memory_model: MemoryModel
    quality_model: QualityModel = field(repr=False)
    min_tokens: int
    candidates: tuple[Candidate, ...]
    frontier: tuple[Candidate, ...]
    recommendation: Candidate | None
    message: str
    notes: tuple[str, ...] = ()

    @property
    def quality_source(self) -> str:
        """Where the quality estimates come from."""
        return self.quality_model.source

    @property
    def fits(self) -> bool:
        """Whether any candidate fits."""
        return self.recommendation is not None

    def policy_spec(self) -> PolicySpec:
        """The recommendation as a :class:`~kvpress_aqua.spec.PolicySpec` (``spec.build()`` gives the policies)."""
        if self.recommendation is None:
            raise ValueError(f"nothing fits, so there is no preset to emit: {self.message}")
        r, mm = self.recommendation, self.memory_model
        description = (
            f"kvtool plan for {self.model.info.name}: {mm.context:,} context, batch {mm.batch}, "
            f"{mm.new_tokens} new tokens, {mm.dtype}, budget {format_bytes(self.budget)}: {r.label(mm.seen)}, "
            f"estimated quality {r.quality:.3f} ({self.quality_source})"
        )
        return PolicySpec(name="plan", entries=r.entries, description=description)

    def to_toml(self) -> str:
        """The recommendation as a preset TOML document (loadable by ``parse_policy`` / ``CompressedCache``)."""
        return self.policy_spec().to_toml()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plan: inputs, model, candidates, frontier, recommendation, message."""
        mm, info = self.memory_model, self.model.info
        return {
            "budget_bytes": self.budget,
            "model": {
                "name": info.name, "source": self.model.source, "model_type": info.model_type,
                "layers": info.num_layers, "heads": info.num_heads, "kv_heads": info.num_kv_heads,
                "head_dim": info.head_dim, "sliding_window": info.sliding_window,
                "sliding_layers": sum(w is not None for w in mm.windows), "parameters": self.model.parameters,
            },
            "dtype": mm.dtype, "context": mm.context, "batch": mm.batch, "new_tokens": mm.new_tokens,
            "prefill_chunk": mm.prefill_chunk, "overhead_bytes": mm.overhead, "token_policy": mm.token_policy,
            "min_tokens": self.min_tokens, "quality_source": self.quality_source,
            "quality_kind": self.quality_model.kind,
            "candidates": [c.to_dict() for c in self.candidates],
            "frontier": [c.to_dict() for c in self.frontier],
            "recommendation": self.recommendation.to_dict() if self.recommendation else None,
            "fits": self.fits, "message": self.message, "notes": list(self.notes),
        }

    def explain(self) -> str:
        """The memory formula with this plan's numbers substituted (recommendation, else the cheapest point)."""
        point = self.recommendation or min(self.candidates, key=lambda c: c.memory.total)
        m, mm = point.memory, self.memory_model
        lines = [
            f"Memory formula for {point.label(mm.seen)} ({mm.batch} × {mm.context:,}-token prompts, "
            f"{mm.new_tokens} new tokens, {mm.dtype}: e = {mm.elem} B, B = {mm.batch}):",
            "  total = weights + AQUA projections + overhead + max over phases (KV held + attention + activations "
            "+ layer copy)",
        ]
        for t in m.terms:
            lines += [f"  {t.name}", f"    = {t.formula}", f"    = {t.numbers}",
                      f"    = {t.nbytes:,} B ({format_bytes(t.nbytes)})"]
        lines.append(
            f"  total = {m.weights:,} + {m.projections:,} + {m.overhead:,} + ({m.peak_kv:,} + {m.attention:,} + "
            f"{m.activations:,} + {m.copy:,}) = {m.total:,} B ({format_bytes(m.total)}) at the {m.peak_phase} peak"
        )
        lines.append(
            f"  constants: ATTENTION_COPIES={ATTENTION_COPIES}, HIDDEN_COPIES={HIDDEN_COPIES}, "
            f"MLP_COPIES={MLP_COPIES}, overhead={format_bytes(mm.overhead)}; the KV terms are exact "
            "(kvpress_aqua.accounting), the rest are estimates"
        )
        return "\n".join(lines)

    def curves(self, points: int = 24) -> dict[float, list[tuple[int, float]]]:
        """``k_ratio -> [(total bytes, quality)]`` for budgets from ``min_tokens`` to every token, by bytes (plots)."""
        mm = self.memory_model
        out = {}
        for c in self.candidates:
            row = []
            for b in _budget_grid(self.min_tokens, mm.seen - 2, points) + [None]:
                point = _point(mm, self.quality_model, c.key_dim, b, fits=True, verdict="")
                row.append((point.memory.total, point.quality))
            out[c.k_ratio] = sorted(row)
        return out


def _budget_grid(low: int, high: int, points: int) -> list[int]:
    """About ``points`` budgets spaced geometrically from ``low`` to ``high`` (both included)."""
    if high < low:
        return []
    ratio = (high / low) ** (1 / max(points - 1, 1))
    return sorted({min(high, round(low * ratio**i)) for i in range(points)} | {high})


def _point(mm: MemoryModel, quality: QualityModel, key_dim: int, budget: int | None, fits: bool,
           verdict: str) -> Candidate:
    k_ratio = key_dim / mm.shape.info.head_dim
    retained = 1.0 if budget is None else budget / mm.seen
    return Candidate(
        k_ratio=k_ratio, key_dim=key_dim, token_budget=budget, retained=retained,
        memory=mm.evaluate(key_dim, budget), quality=quality(k_ratio, retained, mm.token_policy), fits=fits,
        verdict=verdict, entries=_entries(mm, key_dim, budget),
    )


def _frontier(mm: MemoryModel, quality: QualityModel, fitting: Sequence[Candidate], min_tokens: int,
              points: int = 16) -> list[Candidate]:
    """Pareto frontier of every fitting key width over budgets up to its largest, cheapest first."""
    pool = []
    for c in fitting:
        top = mm.seen - 2 if c.token_budget is None else c.token_budget
        budgets = [b for b in _budget_grid(min_tokens, top, points) if b != c.token_budget]
        pool += [_point(mm, quality, c.key_dim, b, fits=True, verdict="frontier") for b in budgets]
        pool.append(replace(c, verdict="frontier"))
    best = [c for c in pool if not any(_dominates(o, c) for o in pool)]
    unique = {(c.key_dim, c.token_budget): c for c in best}
    return sorted(unique.values(), key=lambda c: (c.memory.total, -c.quality))


def _entries(mm: MemoryModel, key_dim: int, budget: int | None) -> tuple[dict[str, Any], ...]:
    info = mm.shape.info
    entries = []
    if budget is not None:
        windows = [w for w in mm.windows if w is not None]
        max_sinks = min(windows) - 1 if windows else DEFAULT_SINKS
        entries.append(token_entry(mm.token_policy, budget, max_sinks))
    if key_dim < info.head_dim:
        entries.append({"type": "aqua", "k_ratio": key_dim / info.head_dim})
    return tuple(entries)


def _largest_budget(mm: MemoryModel, key_dim: int, limit: int, lowest: int) -> tuple[bool, int | None]:
    """``(fits, budget)``: every token (``None``) if that fits, else the largest budget in ``[lowest, seen - 2]``.

    When nothing fits, the budget returned is the cheaper of every token and ``lowest``.
    """
    keep_all = mm.evaluate(key_dim, None).total
    if keep_all <= limit:
        return True, None
    lo, hi = lowest, mm.seen - 2
    if hi < lo:
        return False, None
    if mm.evaluate(key_dim, lo).total > limit:
        return False, lo if mm.evaluate(key_dim, lo).total < keep_all else None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mm.evaluate(key_dim, mid).total <= limit:
            lo = mid
        else:
            hi = mid - 1
    return True, lo


def _smallest_budget(mm: MemoryModel, min_tokens: int) -> int | None:
    return min_tokens if mm.seen - 2 >= min_tokens else None


def _cheapest(mm: MemoryModel, min_tokens: int) -> tuple[int, int | None, Breakdown]:
    """The smallest-memory point: any key width, keeping every token or the smallest budget considered.

    Keeping every token can be the cheaper of the two: a plain ``DynamicCache`` has no slot metadata
    and the model's fused attention materializes no score matrix.
    """
    budgets = {None, _smallest_budget(mm, min_tokens)}
    points = [(k, b, mm.evaluate(k, b)) for k in candidate_key_dims(mm.shape.info.head_dim) for b in budgets]
    return min(points, key=lambda p: p[2].total)


def _largest(fits: Any, top: int) -> int:
    """Largest ``x`` in ``[1, top]`` with ``fits(x)`` (monotone), 0 if none."""
    if top < 1 or not fits(1):
        return 0
    lo, hi = 1, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _does_not_fit(mm: MemoryModel, budget: int, min_tokens: int) -> str:
    key_dim, tokens, need = _cheapest(mm, min_tokens)
    k_ratio = key_dim / mm.shape.info.head_dim
    held = f"all {mm.seen:,} tokens" if tokens is None else f"{tokens} tokens"
    fixed = need.weights + need.overhead
    head = (f"does not fit: needs {format_bytes(need.total)} ({need.total:,} B) even at k_ratio {k_ratio:g} "
            f"keeping {held}, you have {format_bytes(budget)} ({budget:,} B)")
    if fixed >= budget:
        return (f"{head}; the weights alone need {format_bytes(need.weights)} plus {format_bytes(need.overhead)} "
                "overhead, so no context or batch fits: use a smaller dtype (--dtype fp8), a smaller model or "
                "more memory")

    def fits_with(**changes: Any) -> bool:
        return _cheapest(replace(mm, **changes), min_tokens)[2].total <= budget

    context = _largest(lambda c: fits_with(context=c), mm.context - 1)
    parts = [f"the largest context that fits at batch {mm.batch} is {context:,} tokens" if context
             else f"no context fits at batch {mm.batch}"]
    if mm.batch > 1:
        batch = _largest(lambda b: fits_with(batch=b), mm.batch - 1)
        parts.append(f"the largest batch that fits at {mm.context:,} tokens is {batch}" if batch
                     else f"not even batch 1 fits at {mm.context:,} tokens")
    current = mm.prefill_chunk or mm.context
    chunk = next((c for c in _CHUNK_HINTS if c < min(current, mm.context) and fits_with(prefill_chunk=c)), None)
    if chunk:
        parts.append(f"with --prefill-chunk {chunk} the full request fits")
    return f"{head}; " + "; ".join(parts)


def _check_int(name: str, value: Any, minimum: int, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value).strip())
        except ValueError:
            raise ValueError(f"{name} {value!r} is not a whole number; e.g. {example}") from None
    if value < minimum:
        raise ValueError(f"{name} {value} must be at least {minimum}; e.g. {example}")
    return value


def plan(
    budget: int | str,
    model: str | Path | PretrainedConfig,
    context: int | str | None = None,
    batch: int = 1,
    new_tokens: int = 0,
    dtype: str | None = None,
    prefill_chunk: int | str | None = None,
    overhead: int | str | None = None,
    *,
    token_policy: str = "h2o",
    min_tokens: int = DEFAULT_MIN_TOKENS,
    quality: QualityModel | None = None,
    artifact: str | Path | None = None,
) -> Plan:
    """Pick ``k_ratio`` and the token budget together under a memory budget.

    Parameters
    ----------
    budget : int or str
        Memory budget: bytes, or a size string (``"8GB"`` = 8*10^9, ``"24GiB"`` = 24*2^30).
    model : str, Path or PretrainedConfig
        Hub id, short name (``"smollm2-135m"``), model folder, config.json, or a config object.
    context : int or str, optional
        Prompt tokens (``"128k"`` = 131072); default the model's ``max_position_embeddings``.
    batch : int, default 1
        Sequences decoded together.
    new_tokens : int, default 0
        Tokens generated per sequence.
    dtype : str, optional
        ``fp32``, ``bf16``, ``fp16`` or ``fp8`` for weights and KV; default the config's dtype, else fp32.
    prefill_chunk : int or str, optional
        Prefill chunk size (``CompressedCache(prefill_chunk=...)`` with ``cache.prefill``); default one chunk.
    overhead : int or str, optional
        Runtime overhead (bytes or a size string); default :data:`DEFAULT_OVERHEAD`.
    token_policy : {"h2o", "sliding"}, default "h2o"
        Eviction policy of the plans.
    min_tokens : int, default 64
        Plans keeping fewer tokens per sequence count as not fitting.
    quality : QualityModel, optional
        Quality source; default: the sweep stored beside the model's AQUA artifact, else the
        artifact's SVD spectrum, else the default curve (:attr:`Plan.quality_source` says which and why).
    artifact : str or Path, optional
        The AQUA artifact to read the quality model from; default the one ``kvtool calibrate`` wrote.

    Returns
    -------
    Plan

    Raises
    ------
    ValueError
        Bad input, naming the fix: non-positive budget or context, malformed size, unknown dtype or model.

    """
    limit = parse_size(budget, "budget")
    shape = resolve_model(model)
    if context is None:
        if shape.max_position_embeddings is None:
            raise ValueError("the model config has no max_position_embeddings; give the context, e.g. --context 8192")
        context = shape.max_position_embeddings
    tokens = parse_tokens(context, "context")
    batch = _check_int("batch", batch, 1, "--batch 1")
    new_tokens = _check_int("new tokens", new_tokens, 0, "--new-tokens 256")
    chunk = None if prefill_chunk is None else parse_tokens(prefill_chunk, "prefill chunk")
    min_tokens = _check_int("min tokens", min_tokens, 1, "64")
    if token_policy not in _TOKEN_POLICIES:
        raise ValueError(f"token policy {token_policy!r}: use one of {', '.join(_TOKEN_POLICIES)}")
    dtype_name = dtype or shape.dtype or "float32"
    dtype_bytes(dtype_name)
    dtype_name = _SHORT_DTYPE.get(dtype_name.lower(), dtype_name.lower())
    overhead_bytes = DEFAULT_OVERHEAD if overhead is None else (
        0 if str(overhead).strip() == "0" else parse_size(overhead, "overhead")
    )
    mm = MemoryModel(shape, batch, tokens, new_tokens, dtype_name, chunk, overhead_bytes, token_policy)
    quality_model = quality or _find_quality(shape.info, artifact, token_policy)

    points = []
    for key_dim in candidate_key_dims(shape.info.head_dim):
        fits, b = _largest_budget(mm, key_dim, limit, min_tokens)
        points.append(_point(mm, quality_model, key_dim, b, fits, "fits" if fits else "does not fit"))
    fitting = [c for c in points if c.fits]
    best = max(fitting, key=lambda c: (round(c.quality, 9), -c.memory.total), default=None)
    points = [replace(c, verdict="recommended") if c is best else c for c in points]
    best = next((c for c in points if c.verdict == "recommended"), None)
    frontier = _frontier(mm, quality_model, fitting, min_tokens)
    if best is not None:
        message = (f"fits: {best.label(mm.seen)}; predicted peak {format_bytes(best.memory.total)} of "
                   f"{format_bytes(limit)}, KV cache {format_bytes(best.memory.cache_bytes)}, estimated quality "
                   f"{best.quality:.3f}")
    else:
        message = _does_not_fit(mm, limit, min_tokens)
    notes = list(shape.notes)
    if shape.max_position_embeddings and mm.context + new_tokens > shape.max_position_embeddings:
        notes.append(f"context + new tokens = {mm.context + new_tokens:,} exceeds the model's "
                     f"max_position_embeddings {shape.max_position_embeddings:,}")
    if dtype is None and shape.dtype is None:
        notes.append("the config states no dtype; planned for fp32 (pass --dtype)")
    if best is not None and best.memory.attention > best.memory.peak_kv:
        notes.append(f"prefill attention scores ({format_bytes(best.memory.attention)}) outweigh the KV cache at the "
                     "peak; a smaller --prefill-chunk leaves room for more tokens")
    if any(e["type"] == "aqua" for e in (best.entries if best else ())):
        notes.append("AQUA needs a calibration artifact for this model (kvtool calibrate) before the cache is built")
    return Plan(limit, shape, mm, quality_model, min_tokens, tuple(points), tuple(frontier), best, message,
                tuple(notes))


def _dominates(a: Candidate, b: Candidate) -> bool:
    """``a`` is no worse than ``b`` on total bytes and quality, and better on one."""
    no_worse = a.memory.total <= b.memory.total and a.quality >= b.quality
    return no_worse and (a.memory.total < b.memory.total or a.quality > b.quality)

"""A run split over several GPUs: what each device holds (``kvtool plan --gpus N --parallel tp|pipeline``).

:class:`Parallel` names the split; :meth:`Parallel.shares` gives one :class:`Share` per device,
which :class:`~kvpress_aqua.planner.memory.MemoryModel` turns into that device's bytes.

- **tp** (``from_pretrained(..., tp_plan="auto")`` under ``torchrun``): every rank holds every layer
  with ``1/N`` of its query and KV heads, so ``1/N`` of the KV cache (the cache's per-sequence
  start counter is kept whole on every rank) and ``1/N`` of the attention working set. Weights as
  transformers' plans for the Llama family (Llama, Mistral, Qwen2/3, Gemma-2/3) shard them: q/k/v
  by columns and the output projection by rows (``1/N`` each), gate/up by columns and down by rows
  (``ceil(I/N)`` channels on the largest rank), the norms whole; ``embed_tokens`` is not in the
  plan, so every rank holds the whole embedding matrix, and an untied ``lm_head``
  (``colwise_gather_output``) ``ceil(V/N)`` of its rows; a tied one is the embedding matrix. The
  logits are gathered whole on every rank. KV heads must divide evenly (:meth:`Parallel.check`).
  Phi-3's plan gathers its fused q/k/v output whole on every rank (:data:`GATHERED_QKV`): its
  weights split the same way, but every rank attends with every head and holds the whole KV cache.
- **pipeline** (accelerate's ``device_map="auto"``, whole layers on different GPUs): modules are
  placed in order (embeddings, decoder layers, final norm, ``lm_head``) by the rule
  :func:`pipeline_devices` states; each device holds the KV cache and the working set of its own
  layers, and the logits are where ``lm_head`` is. A tied ``lm_head`` adds no weights and sits with
  the embeddings (on the first GPU).

Every device also pays its own runtime overhead (CUDA context, allocator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .model_shape import ModelShape, parameter_parts

__all__ = ["BUFFER_FACTOR", "GATHERED_QKV", "PARALLEL_MODES", "Parallel", "Share", "pipeline_devices"]

PARALLEL_MODES = ("tp", "pipeline")
"""How a run is split: tensor parallelism (heads across ranks) or a pipeline (whole layers per GPU)."""
GATHERED_QKV = frozenset({"phi3"})
"""Families whose transformers tensor-parallel plan gathers the fused q/k/v projection's output
(``colwise_gather_output``): each rank then computes every head and caches every KV head."""
BUFFER_FACTOR = 1.25
"""The slack a balanced ``device_map`` adds to each GPU's share: 1.25 x the largest block (transformers'
``get_balanced_memory``)."""

_TP_NOTE = ("tp: each rank holds 1/N of every layer's query and KV heads (KV cache and attention 1/N), q/k/v/o and "
            "the MLP split as transformers' plans shard them (largest rank: ceil(I/N) MLP channels), norms and "
            "the embedding matrix whole on every rank (embed_tokens is not in transformers' plan), an untied "
            "lm_head split by vocabulary (ceil(V/N) rows), the logits gathered whole; every rank pays the "
            "overhead")
_PIPELINE_NOTE = ("pipeline: layers split as transformers' device_map='auto' (accelerate's balanced map): every GPU "
                  "but the last may take weights/N plus 1.25 x the largest block (a decoder layer or the embedding "
                  "matrix), the first GPU keeps that largest block free, and the embeddings, decoder layers, final "
                  "norm and lm_head go in order onto the first GPU with room (the last takes the rest; a tied lm_head "
                  "stays with the embeddings); each GPU holds its layers' KV cache and working set, the logits are "
                  "where lm_head is; every GPU pays the overhead")


@dataclass(frozen=True)
class Share:
    """What one device of a split run holds.

    Attributes
    ----------
    index : int
        The device (``cuda:index``; the rank under tensor parallelism).
    layers : tuple of int
        The decoder layers whose KV cache, AQUA projections and working set it holds.
    parameters : int
        Its weights' parameter count.
    logits : bool
        Whether it holds the last token's logits.
    shape : ModelShape
        The model as this device sees it: a tensor-parallel rank's heads, KV heads and MLP width,
        with :attr:`parameters` as its count.

    """

    index: int
    layers: tuple[int, ...]
    parameters: int
    logits: bool
    shape: ModelShape


@dataclass(frozen=True)
class Parallel:
    """A run over ``gpus`` devices, split by ``mode`` (:data:`PARALLEL_MODES`).

    Raises
    ------
    ValueError
        For an unknown mode or fewer than 2 GPUs.

    """

    mode: str
    gpus: int

    def __post_init__(self) -> None:
        if self.mode not in PARALLEL_MODES:
            raise ValueError(f"--parallel {self.mode!r}: use tp (heads split across ranks) or pipeline (whole layers "
                             "per GPU)")
        if self.gpus < 2:
            raise ValueError(f"--gpus {self.gpus}: a split run needs at least 2 GPUs (leave --gpus out for one)")

    @property
    def rule(self) -> str:
        """The split rule, stated for the plan's notes."""
        return _TP_NOTE if self.mode == "tp" else _PIPELINE_NOTE

    def check(self, shape: ModelShape) -> None:
        """Refuse a split the model cannot take: KV heads (or layers) that do not divide over the GPUs.

        Raises
        ------
        ValueError
            Under ``tp`` when ``num_kv_heads % gpus != 0``, naming the GPU counts that work and
            ``--parallel pipeline``; under ``pipeline`` with more GPUs than layers.

        """
        info = shape.info
        if self.mode == "tp" and info.model_type not in GATHERED_QKV and info.num_kv_heads % self.gpus:
            fits = [n for n in range(2, info.num_kv_heads + 1) if info.num_kv_heads % n == 0]
            counts = f"--gpus {' or '.join(map(str, fits))}" if fits else "no --gpus > 1"
            raise ValueError(f"--parallel tp --gpus {self.gpus}: {info.name} has {info.num_kv_heads} KV heads, which "
                             f"do not split evenly over {self.gpus} ranks; use {counts} (a divisor of "
                             f"{info.num_kv_heads}), or --parallel pipeline")
        if self.mode == "pipeline" and self.gpus > info.num_layers:
            raise ValueError(f"--parallel pipeline --gpus {self.gpus}: {info.name} has only {info.num_layers} layers; "
                             f"use --gpus {info.num_layers} or fewer")

    def shares(self, shape: ModelShape) -> tuple[Share, ...]:
        """One :class:`Share` per device, in device order (:meth:`check` first)."""
        self.check(shape)
        parts = parameter_parts(shape.source_config)
        n, info = self.gpus, shape.info
        if self.mode == "tp":
            width = math.ceil(parts.mlp_width / n)
            head = parts.embeddings if parts.lm_head == 0 else parts.embeddings + math.ceil(shape.vocab_size / n) * \
                shape.hidden_size
            params = head + parts.final_norm + parts.layers * (
                math.ceil(parts.attention_split / n) + parts.mlp_column * width + parts.layer_replicated)
            heads = 1 if info.model_type in GATHERED_QKV else n  # those ranks attend with every head
            rank = replace(shape, info=replace(info, num_heads=info.num_heads // heads,
                                               num_kv_heads=info.num_kv_heads // heads),
                           intermediate_size=width, parameters=params)
            layers = tuple(range(info.num_layers))
            return tuple(Share(i, layers, params, True, rank) for i in range(n))
        head = shape.vocab_size * shape.hidden_size  # a tied head counts in the balance too
        *first, norm, last = pipeline_devices(
            (parts.embeddings, *[parts.layer] * parts.layers, parts.final_norm, head), n)
        embed, layer_devices = first[0], first[1:]
        if parts.lm_head == 0:  # tied: the head is the embedding matrix, on its GPU
            last = embed
        shares = []
        for i in range(n):
            layers = tuple(j for j, dev in enumerate(layer_devices) if dev == i)
            params = len(layers) * parts.layer + sum(size for size, dev in (
                (parts.embeddings, embed), (parts.final_norm, norm), (parts.lm_head, last)) if dev == i)
            shares.append(Share(i, layers, params, last == i, replace(shape, parameters=params)))
        return tuple(shares)


def pipeline_devices(blocks: Sequence[int], gpus: int) -> tuple[int, ...]:
    """The GPU of each block under a balanced ``device_map`` (sizes in parameters, blocks in model order).

    The rule of transformers' ``device_map="auto"`` (its ``get_balanced_memory``, then accelerate's
    ``infer_auto_device_map``) for a decoder whose blocks are the embeddings, the decoder layers,
    the final norm and ``lm_head`` (counted even when tied to the embeddings, as transformers'
    module sizes count it): every GPU but the last may hold ``sum(blocks) // gpus + int(1.25 x
    largest block)``; the first keeps the largest block free besides; the blocks go in order onto
    the current GPU while it has room, else onto the next, and the last GPU takes whatever is left.
    A GPU may be left without layers.

    Parameters
    ----------
    blocks : sequence of int
        Parameters of each block, in the order the model runs them.
    gpus : int
        GPUs.

    Returns
    -------
    tuple of int
        The GPU of each block: non-decreasing, so every GPU holds a contiguous run.

    """
    largest = max(blocks)
    room = [sum(blocks) // gpus + int(BUFFER_FACTOR * largest)] * (gpus - 1) + [math.inf]
    room[0] -= largest
    devices, device, used = [], 0, 0
    for size in blocks:
        while used + size > room[device]:
            device, used = device + 1, 0
        used += size
        devices.append(device)
    return tuple(devices)

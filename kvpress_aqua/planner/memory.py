"""The planner's memory model: the bytes of a run for any key width and token budget.

:class:`MemoryModel` predicts, from a :class:`~kvpress_aqua.planner.model_shape.ModelShape` and the run's
batch, context, new tokens, dtype and chunking, the peak bytes of a cache storing ``d_k`` key
channels with a token budget ``b`` (:func:`kvpress_aqua.planner.search.plan` searches over both).

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
    attention output; keys and values). ``scores``, the *attention* term: the cache's attention adds
    :data:`ATTENTION_COPIES` query-sized tensors ``B x n x H x d x e`` (regrouped queries, output, its
    transposed copy) and, in the reference attention, two float32 score blocks of at most
    ``BLOCK_SCORE_BYTES`` (``B x H x n x (held + n) x 4`` when smaller); the fused kernel materializes
    no score matrix. A plain ``DynamicCache``
    keeps the model's fused SDPA (no score matrix): 0 when it
    runs with ``is_causal`` (the first chunk, decode steps); a chunk after the first gets a boolean
    mask, ``B x n x held`` bytes, and under GQA/MQA SDPA then expands K and V to every query head,
    ``2 x B x H x held x d x e``.
  * MLP step: ``B x n x (HIDDEN_COPIES x h + MLP_COPIES x I) x e`` (the residual stream copies; gate
    activation, up, their product); the attention term is then 0.

  Both add the last token's logits ``B x V x (e + 4)`` (model dtype and the float32 copy ``generate``
  makes) to the activations.
  * copy: one layer's KV held twice while ``torch.cat``/``gather`` builds the layer's new tensors.
    A compressed cache finalizes its layers one after the other, so while a chunk of ``n`` tokens is
    attended only the current layer holds ``min(lo, b) + n`` slots (its old ``min(lo, b)`` alive until
    the cat is done: the copy); the others already hold their evicted size. A last chunk of one token
    (``context % n == 1``, ``n = 1``) is a decode step of a budgeted layer instead (its growing decode
    buffer, :func:`~kvpress_aqua.core.accounting.prefill_slots`): it is charged as the decode phase is.

  With ``new_tokens >= 2`` the decode peak uses ``n = 1`` and the decode slots; otherwise only the
  prefill peak counts. ``n`` is ``prefill_chunk`` (prefill through ``CompressedCache.prefill``) or the
  whole context.

The KV bytes the plan reports (``Breakdown.cache_bytes``: KV held at the end plus projections) are
what ``CompressedCache.nbytes()`` measures after prefilling ``context`` tokens and feeding
``new_tokens - 1`` decode tokens (the last generated token is never fed back). The working-set
constants are estimates (``benchmarks/plan_rss.py`` measures them); the KV bytes are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..core.accounting import (
    EXACT_SLOT_BYTES,
    INDEX_BYTES,
    SCORE_BYTES,
    START_BYTES,
    VALID_BYTES,
    capped_budget,
    decode_slots,
    dense_layer_tokens,
    layer_nbytes,
    prefill_slots,
)
from ..ops.limits import BLOCK_SCORE_BYTES
from ..policies.registry import AQUA_EXACT_RECENT, AQUA_EXACT_SINKS, policy_type
from ..util.dtypes import dtype_bytes
from .model_shape import ModelShape

__all__ = ["ATTENTION_COPIES", "DEFAULT_OVERHEAD", "HIDDEN_COPIES", "MLP_COPIES", "Breakdown", "MemoryModel", "Term"]

DEFAULT_OVERHEAD = 512 * 2**20
"""Runtime overhead charged when none is given: interpreter, framework, CUDA context, allocator slack."""
ATTENTION_COPIES = 3
"""Query-sized tensors the cache's attention adds at a layer's attention step: the queries regrouped per KV
head, the output and its transposed copy (the fused kernel holds no score matrix; the reference attention
adds ``2 x BLOCK_SCORE_BYTES`` of scores per block of query rows)."""
HIDDEN_COPIES = 4
"""Hidden-size activations alive per token in a decoder layer (embeddings, layer input, residual, normed input)."""
MLP_COPIES = 3
"""MLP-width activations alive per token at the MLP step (gate activation, up, their product)."""


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
    max_kv : int
        The most KV the cache holds at any moment checked (every phase, and the end): what a KV-cache
        budget (``plan(budget=...)``) bounds, with the projections (:attr:`cache_peak`).
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
    max_kv: int
    terms: tuple[Term, ...] = field(repr=False)

    @property
    def cache_bytes(self) -> int:
        """What ``CompressedCache.nbytes()`` measures at the end: KV plus projection matrices."""
        return self.kv + self.projections

    @property
    def cache_peak(self) -> int:
        """The most the cache holds at once: KV at its largest (:attr:`max_kv`) plus projection matrices."""
        return self.max_kv + self.projections

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
    token_policy : str
        The eviction policy, a token policy of :mod:`kvpress_aqua.policies.registry` (``h2o``,
        ``tova``, ``sliding``); those that read attention scores (H2O, TOVA) keep a float32 score per slot.
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
    exact_tokens: int = AQUA_EXACT_SINKS + AQUA_EXACT_RECENT

    @property
    def needs_scores(self) -> bool:
        """Whether the token policy keeps a float32 score per slot (the registry says so)."""
        return policy_type(self.token_policy, "token").needs_scores

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
        scores = budget is not None and self.needs_scores

        def layer(slots: int) -> int:
            return layer_nbytes(batch, info.num_kv_heads, slots, key_dim, d, e, compressed=compressed,
                                needs_scores=scores, exact_tokens=self.exact_tokens, residual_dim=d - key_dim)

        def visible(lo: int, n: int, window: int | None) -> int:
            limit = capped_budget(budget, window)
            return (lo if limit is None else min(lo, limit)) + n

        def stored(lo: int, n: int, window: int | None) -> int:
            return visible(lo, n, window) if compressed else dense_layer_tokens(lo + n, window)

        phases = []
        budgeted = budget is not None or any(w is not None for w in self.windows)
        for lo, n in self._chunks():
            if compressed and n == 1 and budgeted:
                # a 1-token chunk is a decode step of a budgeted layer (its decode buffer, up to one growth
                # step more than the tokens): every layer holds what prefill_slots says, no eviction follows
                slots = tuple(prefill_slots(capped_budget(budget, w), lo + 1, self.prefill_chunk)
                              for w in self.windows)
                phases.append(self._phase("prefill", lo, n, slots, slots, layer, compressed))
            elif compressed:
                # Layers are finalized one after the other: while the last layer attends the chunk, the
                # others already hold their evicted size, and its old tensors live on until the cat is done.
                caps = [capped_budget(budget, w) for w in self.windows]
                before = [lo if c is None else min(lo, c) for c in caps]
                during = [x + n for x in before]
                after = [x if c is None or x <= c + 1 else c for x, c in zip(during, caps, strict=True)]
                grows = max(range(len(caps)), key=lambda i: layer(during[i]) - layer(after[i]))
                slots = tuple(during[i] if i == grows else after[i] for i in range(len(caps)))
                phases.append(self._phase("prefill", lo, n, slots, tuple(during), layer, compressed,
                                          copy=layer(before[grows])))
            else:
                slots = tuple(stored(lo, n, w) for w in self.windows)
                phases.append(self._phase("prefill", lo, n, slots, slots, layer, compressed))
        end = phases[0]
        if self.new_tokens >= 2:
            slots = tuple(
                decode_slots(budget, self.seen, w, prompt=self.context, chunk=self.prefill_chunk) if compressed
                else dense_layer_tokens(self.seen, w)
                for w in self.windows
            )
            end = self._phase("decode", self.seen - 1, 1, slots, slots, layer, compressed)
            phases.append(end)
        elif compressed:  # what nbytes() reports after the prompt: an overfilled last chunk is evicted at once
            slots = tuple(prefill_slots(capped_budget(budget, w), self.context, self.prefill_chunk)
                          for w in self.windows)
            end = replace(end, slots=slots, kv=sum(layer(x) for x in slots))
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
            max_kv=max(end.kv, *(p.kv for p in phases)),
            terms=self._terms(key_dim, compressed, scores, weights, projections, columns, end, peak),
        )

    def _per_token(self) -> tuple[int, int]:
        """Activation elements per token alive at a layer's attention step and at its MLP step."""
        s, info = self.shape, self.shape.info
        hidden = HIDDEN_COPIES * s.hidden_size
        return (hidden + 2 * info.num_heads * info.head_dim + 2 * info.num_kv_heads * info.head_dim,
                hidden + MLP_COPIES * s.intermediate_size)

    def _phase(self, name: str, lo: int, n: int, slots: Sequence[int], visible: Sequence[int], layer: Any,
               compressed: bool, copy: int | None = None) -> _Phase:
        info, b, e = self.shape.info, self.batch, self.elem
        held = max(visible)
        if compressed:
            blocks = 2 * min(BLOCK_SCORE_BYTES, b * info.num_heads * n * (held + n) * 4)
            scores = ATTENTION_COPIES * b * n * info.num_heads * info.head_dim * e + blocks
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
            copy=max(layer(x) for x in visible) if copy is None else copy,
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
        meta = f"4 + 1 + 4 (index, valid, {self.token_policy} score)" if scores else "4 + 1 (index, valid)"
        exact = (" + B·H_kv·E·((d - d_k)·e + 8) (AQUA's exact tokens and their slots)"
                 if key_dim < info.head_dim and self.exact_tokens else "")
        kv_formula = (f"Σ layers B·H_kv·slots·((d_k + d_v)·e + {meta}){exact} + B·4" if compressed
                      else "Σ layers B·H_kv·tokens·(d_k + d_v)·e  (DynamicCache)")
        where = f"{peak.name} of {peak.chunk:,} token(s) at offset {peak.offset:,}"
        held, n = max(peak.visible), peak.chunk
        if compressed:
            attention = [f"{ATTENTION_COPIES}·B·n·H·d·e + 2·min(BLOCK_SCORE_BYTES, B·H·n·(held + n)·4) (query-sized "
                         "copies in the cache's attention; no score matrix: blocks of query rows in the reference)",
                         f"{ATTENTION_COPIES}·{b}·{n:,}·{info.num_heads}·{info.head_dim}·{e} + 2·min("
                         f"{BLOCK_SCORE_BYTES:,}, {b}·{info.num_heads}·{n:,}·({held:,} + {n:,})·4)"]
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


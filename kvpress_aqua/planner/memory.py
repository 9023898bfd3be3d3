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

A block summary (BalanceKV, uniform sampling; :attr:`MemoryModel.keeps_rate`) has no budget: its
knob is ``halvings``, every forward appends, and after it a layer holds ``h(t) = sinks + recent +
pending + full blocks x block / 2**halvings`` slots of ``t`` tokens
(:func:`~kvpress_aqua.planner.summaries.summary_slots`), each with a float32 log-weight (4 B more
per slot). ``h`` drops whenever a block is reduced, so the peak is searched over every chunk and
decode step that can hold the most (:func:`~kvpress_aqua.planner.timeline.summary_steps`).

Retrieval (:attr:`MemoryModel.retrieves`) holds ``sinks + recent`` slots as a budgeted layer does and
every token in a tier: its knob is ``top_k``, with the proxy ``rank`` and the ``offload`` fields;
:mod:`kvpress_aqua.planner.retrieval` has its layout. Its KV adds the tier's device part, its
attention reads the rows it retrieves beyond its held slots, its copy is the larger of the slots'
copy and the tier's transient, and ``Breakdown.host`` / ``host_peak`` count the host tier.

The KV bytes the plan reports (``Breakdown.cache_bytes``: KV held at the end plus projections) are
what ``CompressedCache.nbytes()`` measures after prefilling ``context`` tokens and feeding
``new_tokens - 1`` decode tokens (the last generated token is never fed back). The working-set
constants are estimates (``benchmarks/plan_rss.py`` measures them); the KV bytes are exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from ..core.accounting import (
    EXACT_SLOT_BYTES,
    INDEX_BYTES,
    LOG_WEIGHT_BYTES,
    SCORE_BYTES,
    START_BYTES,
    VALID_BYTES,
    layer_nbytes,
)
from ..ops.limits import BLOCK_SCORE_BYTES
from ..policies.registry import AQUA_EXACT_RECENT, AQUA_EXACT_SINKS, policy_type, token_policy_names
from ..util.dtypes import dtype_bytes
from .breakdown import Breakdown, Term, combine
from .model_shape import ModelShape
from .parallel import Parallel, Share
from .retrieval import OFFLOADS, PROXY_DTYPES, RETRIEVAL, RETRIEVAL_KNOBS, TierLayout, TierMoment, planned_sinks
from .summaries import MAX_HALVINGS, SUMMARY_POLICIES, halvings_text, summary_slots
from .timeline import Phase, Step, budget_steps, sdpa_masked, summary_steps

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
        The eviction policy, a token policy of :mod:`kvpress_aqua.policies.registry`: one with a
        budget (``h2o``, ``tova``, ``sliding``, ``snapkv``; those that read attention scores keep a
        float32 score per slot) or a block summary (``balancekv``, ``uniform``: its knob is
        ``halvings``, and it keeps a float32 log-weight per slot), or ``retrieval`` (its knob is
        ``top_k``; :mod:`kvpress_aqua.planner.retrieval`).
    exact_tokens : int
        AQUA's exact tokens per sequence and KV head (``exact_sinks + exact_recent``, by default
        ``Aqua``'s): with AQUA each layer also holds their ``head_dim - key_dim`` dropped channels.
    rank : int
        Retrieval only: proxy channels per KV head (:func:`~kvpress_aqua.planner.search.plan` searches it).
    offload : {"cpu", None}
        Retrieval only: the tier in host memory (``"cpu"``) or on the device (``None``).
    proxy_dtype : {"model", "int8"}
        Retrieval only: proxy keys in the model dtype, or int8 with a float32 scale per token.
    parallel : Parallel or None
        A run split over several GPUs: :meth:`evaluate` then returns each device's bytes
        (``Breakdown.devices``) and their sums; ``None``: one device.
    share : Share or None
        One device of a split run (set by :meth:`evaluate`): only its layers' KV, projections and
        working set count, the logits only where it holds them, ``shape`` is that device's view.

    Raises
    ------
    ValueError
        For a block summary on a model with sliding-window layers (not modelled there); for
        an ``offload`` other than ``"cpu"`` or ``None``, a ``proxy_dtype`` other than ``"model"`` or ``"int8"``.

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
    rank: int = 16
    offload: str | None = "cpu"
    proxy_dtype: str = "model"
    parallel: Parallel | None = None
    share: Share | None = None

    def __post_init__(self) -> None:
        if self.offload not in OFFLOADS:
            raise ValueError(f"offload {self.offload!r}: use 'cpu' (the tier in host memory) or None (on the device)")
        if self.proxy_dtype not in PROXY_DTYPES:
            raise ValueError(f"proxy dtype {self.proxy_dtype!r}: use one of {', '.join(PROXY_DTYPES)}")
        windows = {w for w in self.windows if w is not None}
        if self.keeps_rate and windows:
            budgeted = ", ".join(token_policy_names())
            raise ValueError(f"{self.token_policy} keeps block summaries, which the planner does not model on the "
                             f"sliding-window layers of {self.shape.info.name} (window {min(windows):,}: there the "
                             f"cache drops the oldest tokens as the window passes); plan it with --token-policy "
                             f"{budgeted}")

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

    @property
    def keeps_rate(self) -> bool:
        """Whether the token policy is a block summary (BalanceKV, uniform), sized by ``halvings``, not a budget."""
        return policy_type(self.token_policy, "token").name in SUMMARY_POLICIES

    @property
    def retrieves(self) -> bool:
        """Whether the token policy is retrieval: every token in a tier, ``top_k`` of them read per decode step."""
        return policy_type(self.token_policy, "token").name == RETRIEVAL

    @property
    def max_sinks(self) -> int | None:
        """The most sinks a layer can hold here: the smallest sliding window minus one (``None``: no window)."""
        windows = [w for w in self.windows if w is not None]
        return min(windows) - 1 if windows else None

    @property
    def layers(self) -> tuple[int, ...]:
        """The decoder layers whose bytes count here: every layer, or those of :attr:`share`'s device."""
        return tuple(range(self.shape.info.num_layers)) if self.share is None else self.share.layers

    def local(self, slots: Sequence[int]) -> tuple[int, ...]:
        """The entries of a per-layer tuple (slots per layer) that belong to :attr:`layers`."""
        return tuple(slots) if self.share is None else tuple(slots[i] for i in self.share.layers)

    @property
    def held_slots(self) -> int:
        """A retrieval layer's held slots (its budget): its sinks and recent tokens."""
        return planned_sinks(self.max_sinks) + RETRIEVAL_KNOBS["recent"]

    def knobs(self, lowest: int) -> Sequence[int]:
        """The token knobs a plan point may take keeping at least ``lowest`` tokens, cheapest first.

        Memory grows along the sequence: token budgets ``lowest ... seen - 2``; for a block summary
        (:attr:`keeps_rate`) the halvings :data:`~kvpress_aqua.planner.summaries.MAX_HALVINGS` ... 1
        that reduce something and hold at least ``lowest`` tokens; for retrieval the ``top_k`` from
        the fewest that make a decode step attend ``lowest`` tokens to every token before the last
        one that is not held.
        """
        if self.keeps_rate:
            return [h for h in range(MAX_HALVINGS, 0, -1) if lowest <= summary_slots(self.seen, h) < self.seen]
        if self.retrieves:
            return range(max(1, lowest - self.held_slots), self.seen - self.held_slots)
        return range(lowest, self.seen - 1)

    def dearer(self, knob: int) -> int | None:
        """The next knob keeping more tokens: one more token of budget, or one halving fewer (none left: ``None``)."""
        if self.keeps_rate:
            return knob - 1 or None
        return knob + 1

    def held(self, knob: int | None) -> int:
        """Tokens a point holds per layer, KV head and sequence at the end (full-attention layers).

        ``seen`` for ``None`` (every token), the budget, or a block summary's slots for its halvings;
        for retrieval, which keeps every token in its tier, the tokens a decode step attends (held
        slots and ``top_k``).
        """
        if knob is None:
            return self.seen
        if self.retrieves:
            return min(self.seen, self.held_slots + knob)
        return summary_slots(self.seen, knob) if self.keeps_rate else knob

    def knob_text(self, knob: int | None) -> str:
        """``"all 4,096 tokens"``, ``"1,024 tokens"``, ``"top_k 512, rank 8"`` or ``"halvings 2 (1/4 ...)"``."""
        if knob is None:
            return f"all {self.seen:,} tokens"
        if self.retrieves:
            return f"top_k {knob:,}, rank {self.rank}" + (" int8" if self.proxy_dtype == "int8" else "")
        return halvings_text(knob, self.held(knob), self.seen) if self.keeps_rate else f"{knob:,} tokens"

    def evaluate(self, key_dim: int, knob: int | None) -> Breakdown:
        """Predict the bytes of a cache storing ``key_dim`` key channels with the token policy at ``knob``.

        Parameters
        ----------
        key_dim : int
            Stored key channels (``head_dim``: no AQUA).
        knob : int or None
            The token policy's knob: its token budget per layer, KV head and sequence, or for a
            block summary (:attr:`keeps_rate`) its halvings. ``None`` keeps every token (no token
            policy); with neither a token policy nor AQUA the cache is a plain ``DynamicCache``.

        Returns
        -------
        Breakdown
            With :attr:`parallel`, the sums over the devices, each device's in ``devices``.

        """
        if self.parallel is not None and self.share is None:
            alike: dict[tuple, Breakdown] = {}  # tensor-parallel ranks are alike: one evaluation serves them all
            devices = []
            for s in self.parallel.shares(self.shape):
                like = (s.layers, s.parameters, s.logits, s.shape)
                if like not in alike:
                    alike[like] = replace(self, shape=s.shape, share=s).evaluate(key_dim, knob)
                devices.append(alike[like])
            return combine(devices)
        info, e, batch = self.shape.info, self.elem, self.batch
        d = info.head_dim
        summary = knob is not None and self.keeps_rate
        retrieval = knob is not None and self.retrieves
        budget = None if summary else (self.held_slots if retrieval else knob)
        compressed = knob is not None or key_dim < d
        scores = budget is not None and self.needs_scores

        def layer(slots: int) -> int:
            return layer_nbytes(batch, info.num_kv_heads, slots, key_dim, d, e, compressed=compressed,
                                needs_scores=scores, exact_tokens=self.exact_tokens, residual_dim=d - key_dim,
                                weighted=summary)

        if summary:
            steps, last = summary_steps(info.num_layers, self.context, self.prefill_chunk, self.new_tokens, knob)
        else:
            steps, last = budget_steps(self.windows, self.context, self.prefill_chunk, self.new_tokens, budget,
                                       compressed, layer)
        tier = None
        if retrieval:
            tier = TierLayout(batch, len(self.layers), info.num_heads, info.num_kv_heads, d, key_dim, e, self.rank,
                              self.offload is not None, self.proxy_dtype == "int8")

        def moment(step: Step, end: bool = False) -> TierMoment | None:
            if tier is None:
                return None
            past = max(step.visible) if step.copy is None else step.copy
            return tier.moment(self.context, self.prefill_chunk, knob, step.offset, step.chunk, past, end)

        phases = [self._phase(s, layer, compressed, moment(s)) for s in steps]
        end = self._phase(last, layer, compressed, moment(last, end=True))
        peak = max(phases, key=lambda p: p.peak)
        columns = d if self.exact_tokens else key_dim  # exact tokens need the dropped columns of P as well
        projections = len(self.layers) * info.num_kv_heads * d * columns * e if key_dim < d else 0
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
            terms=self._terms(key_dim, compressed, scores, summary, weights, projections, columns, end, peak)
            + (tier.terms(self.context, self.prefill_chunk, knob, self.seen) if tier is not None else ()),
            host=end.tier.host if tier is not None else 0,
            host_peak=max(p.tier.host_peak for p in (*phases, end)) if tier is not None else 0,
        )

    def _per_token(self) -> tuple[int, int]:
        """Activation elements per token alive at a layer's attention step and at its MLP step."""
        s, info = self.shape, self.shape.info
        hidden = HIDDEN_COPIES * s.hidden_size
        return (hidden + 2 * info.num_heads * info.head_dim + 2 * info.num_kv_heads * info.head_dim,
                hidden + MLP_COPIES * s.intermediate_size)

    def _phase(self, step: Step, layer: Callable[[int], int], compressed: bool, tier: TierMoment | None) -> Phase:
        info, b, e = self.shape.info, self.batch, self.elem
        name, lo, n = step.name, step.offset, step.chunk
        held = max(step.visible) + (tier.read if tier is not None else 0)
        copy = max(step.visible) if step.copy is None else step.copy
        if compressed:
            blocks = 2 * min(BLOCK_SCORE_BYTES, b * info.num_heads * n * (held + n) * 4)
            scores = ATTENTION_COPIES * b * n * info.num_heads * info.head_dim * e + blocks
        else:
            scores = b * n * held if sdpa_masked(name, lo) else 0
            if sdpa_masked(name, lo) and info.group_size > 1:
                scores += 2 * b * info.num_heads * held * info.head_dim * e
        at_attention, at_mlp = self._per_token()
        transient = tier.transient if tier is not None else 0  # a retrieval tier's, alive at the attention step only
        attention_step, mlp_step = scores + b * n * at_attention * e + transient, b * n * at_mlp * e
        larger = "attention" if attention_step >= mlp_step else "mlp"
        logits = b * self.shape.vocab_size * (e + 4) if self.share is None or self.share.logits else 0
        return Phase(
            name=name, chunk=n, offset=lo, slots=step.slots, visible=step.visible,
            kv=sum(layer(x) for x in self.local(step.slots)) + (tier.device if tier is not None else 0),
            attention=scores if larger == "attention" else 0,
            activations=b * n * (at_attention if larger == "attention" else at_mlp) * e + logits,
            copy=max(layer(copy), transient if larger == "attention" else 0), copy_slots=copy, step=larger,
            scores=scores, tier=tier,
        )

    def _kv_text(self, slots: Sequence[int], key_dim: int, compressed: bool, scores: bool, weighted: bool) -> str:
        info, e, b = self.shape.info, self.elem, self.batch
        meta = INDEX_BYTES + VALID_BYTES + (SCORE_BYTES if scores else 0) + (LOG_WEIGHT_BYTES if weighted else 0)
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

    def _terms(self, key_dim: int, compressed: bool, scores: bool, weighted: bool, weights: int, projections: int,
               columns: int, end: Phase, peak: Phase) -> tuple[Term, ...]:
        s, info, e, b = self.shape, self.shape.info, self.elem, self.batch
        meta = "4 + 1 (index, valid)"
        if scores or weighted:
            what = "score" if scores else "log-weight"
            meta = f"4 + 1 + 4 (index, valid, {self.token_policy} {what})"
        exact = (" + B·H_kv·E·((d - d_k)·e + 8) (AQUA's exact tokens and their slots)"
                 if key_dim < info.head_dim and self.exact_tokens else "")
        kv_formula = (f"Σ layers B·H_kv·slots·((d_k + d_v)·e + {meta}){exact} + B·4" if compressed
                      else "Σ layers B·H_kv·tokens·(d_k + d_v)·e  (DynamicCache)")
        if end.tier is not None:
            kv_formula += (" + the retrieval tier's device part (proxy keys and validity, working sets, bases; its "
                           "rows too when not offloaded: below)")
        where = f"{peak.name} of {peak.chunk:,} token(s) at offset {peak.offset:,}"
        held, n = max(peak.visible) + (peak.tier.read if peak.tier is not None else 0), peak.chunk
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
        if self.share is not None and not self.share.logits:
            logits_sym, logits_num = "0 (the logits are on another GPU)", "0"
        if peak.step == "attention":
            other = b * n * at_mlp * e
            activations = (f"{attention_sym} + {logits_sym} (attention step; the MLP step, {mlp_sym} = "
                           f"{other:,} B, needs less)", f"{attention_num} + {logits_num}")
        else:
            other = peak.scores + b * n * at_attention * e + (peak.tier.transient if peak.tier is not None else 0)
            tier_part = "" if peak.tier is None else " + the tier's transient"
            activations = (f"{mlp_sym} + {logits_sym} (MLP step; the attention step, attention + {attention_sym}"
                           f"{tier_part} = {other:,} B, needs less)", f"{mlp_num} + {logits_num}")
            if peak.scores:
                attention = [f"0 at the peak (MLP step); at the attention step {attention[0]}: {attention[1]} = "
                             f"{peak.scores:,} B", "0"]
        copied = self._kv_text((peak.copy_slots,), key_dim, compressed, scores, weighted)
        terms = [
            Term("weights", "parameters·e", f"{s.parameters:,}·{e}", weights),
            Term(f"KV at the end ({end.name})", kv_formula,
                 self._kv_text(self.local(end.slots), key_dim, compressed, scores, weighted) + _tier_text(end),
                 end.kv),
            Term("AQUA projections", "L·H_kv·d·d·e (exact tokens need every column of P), else L·H_kv·d·d_k·e",
                 f"{len(self.layers)}·{info.num_kv_heads}·{info.head_dim}·{columns}·{e}" if projections else "no AQUA",
                 projections),
            Term(f"KV held at the peak ({where})", kv_formula,
                 self._kv_text(self.local(peak.slots), key_dim, compressed, scores, weighted) + _tier_text(peak),
                 peak.kv),
            Term("attention", *attention, peak.attention),
            Term("activations", *activations, peak.activations),
            Term("layer copy", "one layer's KV held twice while torch.cat/gather builds its new tensors (a "
                 "compressed layer's old slots, a DynamicCache layer at its visible slots)"
                 + ("" if peak.tier is None else _TIER_COPY),
                 copied if peak.tier is None else f"max({copied}, {peak.tier.transient:,})", peak.copy),
            Term("overhead", "runtime constant (default DEFAULT_OVERHEAD = 512 MiB, --overhead)",
                 f"{self.overhead:,}", self.overhead),
        ]
        return tuple(terms)


_TIER_COPY = ("; for retrieval, the larger of that and the tier's transient: a growing tier's largest old tensor, "
              "a chunk's earlier rows copied to the device and concatenated with the held slots, or a decode step's "
              "new working set, concatenation and float32 proxy scores")


def _tier_text(phase: Phase) -> str:
    """`` + N`` (the retrieval tier's device bytes) after a KV term's numbers; empty without a tier."""
    return "" if phase.tier is None else f" + {phase.tier.device:,}"


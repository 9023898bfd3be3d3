"""Retrieval in the planner: a two-tier cache sized by ``top_k`` and the rank of its proxy keys.

A retrieval cache (:class:`~kvpress_aqua.policies.retrieval.Retrieval`) keeps every token's keys
(at the stored width ``d_k``, pruned under AQUA) and values in a tier: host memory with
``offload="cpu"``, the device with ``offload=None``. On the device each layer also holds:

- its held slots, ``sinks + recent`` tokens (with the decode token, or the prefill chunk), stored
  as any budgeted layer stores them (:func:`~kvpress_aqua.core.accounting.layer_nbytes`);
- a proxy key of every token (``rank`` channels in the model dtype, or int8 with a float32 scale:
  ``proxy_dtype="int8"``) and a validity byte;
- the working set of the last decode step: ``min(top_k, tokens before it)`` rows of keys and
  values, and an int64 token index per row;
- the per-prompt proxy basis (``lrqk``): ``B x H_kv x d x rank`` elements.

The tier grows exactly by each prefill chunk and, at a one-token forward (a decode step), by
``max(16, capacity // 16)`` rows when full (``RetrievalTier._grow``, :func:`tier_growth`). The
planner imports no torch, so this layout is written here; ``tests/test_planner_retrieval.py``
holds it equal to ``cache.nbytes()`` and ``cache.nbytes("host")``.

Transients (estimates, charged as the attending layer's ``copy``): a growing tier replaces its
tensors one at a time, so the largest old one lives beside its copy; a prefill chunk's attention
concatenates the held slots with every earlier token's rows when the tier is resident, and with an
offloaded tier attends the held slots, then the earlier rows a block at a time, each block copied
to the device for its call (``ops.retrieval.chunk_attention``,
:func:`~kvpress_aqua.ops.limits.tier_block_rows` tokens), the calls merged in float32; a decode step
builds the new working set, concatenates
it with the held slots and scores every earlier token with the proxy (float32, per query head,
twice: the logits and their log-softmax; int8 proxy keys are scored from a float32 copy), and
gathers the rows it misses on the host first.

The planner plans the policy's default proxy (``lrqk``, fit on each prompt) and its default
``sinks`` and ``recent`` (:data:`RETRIEVAL_KNOBS`), and searches ``top_k`` and the proxy rank
(:data:`RETRIEVAL_RANKS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..core.accounting import SCORE_BYTES, VALID_BYTES, grown
from ..ops.limits import tier_block_rows
from .breakdown import Term

__all__ = [
    "OFFLOADS",
    "PROXY_DTYPES",
    "PROXY_SCALE_BYTES",
    "RETRIEVAL",
    "RETRIEVAL_KNOBS",
    "RETRIEVAL_RANKS",
    "TOKEN_INDEX_BYTES",
    "TierLayout",
    "TierMoment",
    "planned_sinks",
    "proxy_ranks",
    "retrieval_entry",
    "tier_growth",
    "working_rows",
]

RETRIEVAL = "retrieval"
"""The registry name of the retrieval policy."""
RETRIEVAL_KNOBS = MappingProxyType({"sinks": 4, "recent": 64, "proxy": "lrqk"})
"""The knobs a plan keeps at ``Retrieval()``'s defaults (the tests hold them equal)."""
RETRIEVAL_RANKS = (4, 8, 16, 32)
"""Proxy ranks searched (those no wider than the head)."""
OFFLOADS = ("cpu", None)
"""Where the tier lives: ``"cpu"`` host memory, ``None`` the device."""
PROXY_DTYPES = ("model", "int8")
"""How proxy keys are stored: in the model dtype, or int8 with a float32 scale per token."""
PROXY_SCALE_BYTES = 4
"""The float32 scale of each int8 proxy key (``Retrieval``'s ``INT8_SCALE_BYTES``)."""
TOKEN_INDEX_BYTES = 8
"""The int64 token index of each working-set row."""
PROXY_SCORE_COPIES = 2
"""Float32 proxy-score tensors per query head and token alive at a decode step (logits, log-softmax)."""


def proxy_ranks(head_dim: int) -> tuple[int, ...]:
    """The ranks of :data:`RETRIEVAL_RANKS` no wider than ``head_dim`` (``(head_dim,)`` for narrower heads)."""
    return tuple(r for r in RETRIEVAL_RANKS if r <= head_dim) or (head_dim,)


def retrieval_entry(top_k: int, rank: int, offload: str | None, max_sinks: int | None = None,
                    proxy_dtype: str = "model") -> dict[str, Any]:
    """The spec entry of a planned retrieval cache: absolute ``top_k``, the rank, its dtype, the offload, the defaults.

    ``max_sinks`` caps the sinks (a model's own sliding window minus one; ``None``: no cap).
    """
    return {"type": RETRIEVAL, "top_k": top_k, "recent": RETRIEVAL_KNOBS["recent"], "sinks": planned_sinks(max_sinks),
            "rank": rank, "proxy": RETRIEVAL_KNOBS["proxy"], "proxy_dtype": proxy_dtype, "offload": offload}


def planned_sinks(max_sinks: int | None) -> int:
    """The default sinks, capped at ``max_sinks`` (``None``: no cap)."""
    return RETRIEVAL_KNOBS["sinks"] if max_sinks is None else min(RETRIEVAL_KNOBS["sinks"], max_sinks)


def _chunked(context: int, chunk: int | None) -> tuple[int, int]:
    """``(chunk, tokens appended by forwards of two tokens or more)``: those grow the tier exactly."""
    chunk = min(chunk or context, context)
    if chunk < 2:
        return chunk, 0
    last = context - chunk * ((context - 1) // chunk)
    return chunk, context if last > 1 else context - 1


def tier_growth(context: int, chunk: int | None, tokens: int) -> tuple[int, int]:
    """``(rows before the last growth, rows)`` of one layer's tier once the first ``tokens`` tokens were fed.

    The prompt goes in forwards of ``chunk`` tokens (``None``: one forward), then one token per
    decode step; ``tokens`` is a forward's end. A forward of ``n >= 2`` tokens grows the tier to
    exactly the rows needed; a one-token forward (a decode step, or a last prefill chunk of one
    token) grows a full tier by :func:`~kvpress_aqua.core.accounting.grown`.
    """
    chunk, appended = _chunked(context, chunk)
    if tokens <= appended:
        return (tokens - 1) // chunk * chunk if tokens else 0, tokens
    old = (appended - 1) // chunk * chunk if appended else 0
    rows = used = appended
    steps = tokens - appended
    while steps:
        if used == rows:
            old, rows = rows, grown(rows)
        taken = min(steps, rows - used)
        used, steps = used + taken, steps - taken
    return old, rows


def working_rows(context: int, chunk: int | None, top_k: int, tokens: int) -> int:
    """Rows of a layer's working set once the first ``tokens`` tokens were fed (and the forward folded).

    A one-token forward with earlier tokens (a decode step) retrieves ``min(top_k, tokens before
    it)`` rows; a chunk keeps the working set it found, and no decode step comes before a chunk.
    """
    _, appended = _chunked(context, chunk)
    return min(top_k, tokens - 1) if tokens - 1 >= max(appended, 1) else 0


@dataclass(frozen=True)
class TierMoment:
    """A retrieval cache's tier at one moment of a run, every layer together.

    Attributes
    ----------
    device : int
        Tier bytes on the device: proxy keys and validity, working sets, per-prompt bases (and the
        tier's rows with ``offload=None``).
    host : int
        The tier's rows in host memory (``offload="cpu"``).
    host_peak : int
        :attr:`host` with the host transient (a growing tier's old values, a decode step's gathered misses).
    transient : int
        The attending layer's device transient (growth, or the rows its attention reads and concatenates).
    read : int
        Rows the attending layer's attention reads beyond its held slots (per sequence and KV head).

    """

    device: int
    host: int
    host_peak: int
    transient: int
    read: int


@dataclass(frozen=True)
class TierLayout:
    """The shapes of a retrieval cache's tier: what one row, proxy key, working-set row and basis cost.

    Attributes
    ----------
    batch, layers, heads, kv_heads, head_dim : int
        The run's sequences and the model's attention shapes.
    key_dim : int
        Stored key channels (``head_dim`` without AQUA).
    elem : int
        Bytes per element (the model dtype).
    rank : int
        Proxy channels per KV head.
    offload : bool
        The tier's rows in host memory (else on the device).
    int8 : bool
        Proxy keys stored as int8 with a float32 scale per token (else in the model dtype).

    """

    batch: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    key_dim: int
    elem: int
    rank: int
    offload: bool
    int8: bool = False

    @property
    def rows(self) -> int:
        """Sequences x KV heads: the rows of one token in one layer."""
        return self.batch * self.kv_heads

    @property
    def row(self) -> int:
        """Bytes of one token's stored key and value for one KV head."""
        return (self.key_dim + self.head_dim) * self.elem

    def tier(self, tokens: int) -> int:
        """One layer's tier rows: ``B·H_kv·tokens·(d_k + d)·e``."""
        return self.rows * tokens * self.row

    @property
    def proxy_key(self) -> int:
        """Bytes of one token's proxy key for one KV head: ``rank·e``, or ``rank + 4`` in int8 with its scale."""
        return self.rank + PROXY_SCALE_BYTES if self.int8 else self.rank * self.elem

    def proxy(self, tokens: int) -> int:
        """One layer's proxy keys and validity: ``B·H_kv·tokens·(proxy key + 1)``."""
        return self.rows * tokens * (self.proxy_key + VALID_BYTES)

    def working(self, tokens: int) -> int:
        """Working-set rows with their token index: ``B·H_kv·tokens·((d_k + d)·e + 8)``."""
        return self.rows * tokens * (self.row + TOKEN_INDEX_BYTES)

    @property
    def basis(self) -> int:
        """One layer's per-prompt proxy basis: ``B·H_kv·d·rank·e``."""
        return self.rows * self.head_dim * self.rank * self.elem

    def moment(self, context: int, chunk: int | None, top_k: int, offset: int, n: int, past: int,
               end: bool = False) -> TierMoment:
        """The tier while the last layer attends the forward of ``n`` tokens at ``offset`` (or after it: ``end``).

        The layers before the last were finalized already (their working sets and bases are this
        forward's); the last one still holds its working set of the forward before and, at the
        first forward, no basis. ``past`` is the attending layer's held slots before the forward.
        """
        old, rows = tier_growth(context, chunk, offset + n)
        latest = working_rows(context, chunk, top_k, offset + n)
        last = latest if end else working_rows(context, chunk, top_k, offset)
        bases = self.layers if end or offset else self.layers - 1
        on_device = self.proxy(rows) + (0 if self.offload else self.tier(rows))
        device = self.layers * on_device + self.working((self.layers - 1) * latest + last) + bases * self.basis
        decode = n == 1 and offset > 0
        read = min(top_k, offset) if decode else offset
        if decode:
            concat = self.rows * (past + read) * (self.row + VALID_BYTES)  # the past block rebuilt, its visibility
            reading = self.working(read) + PROXY_SCORE_COPIES * self.batch * self.heads * offset * SCORE_BYTES
            reading += self.rows * offset * self.rank * SCORE_BYTES if self.int8 else 0  # int8 keys scored in float32
            gathered = self.rows * read * self.head_dim * self.elem if self.offload else 0
        elif self.offload:  # one block of earlier rows copied at a time, the merged and the block's outputs
            block = min(offset, tier_block_rows(self.rows, self.row))
            concat, gathered = 0, 0
            reading = self.tier(block) + 2 * self.batch * self.heads * n * self.head_dim * SCORE_BYTES if offset else 0
        else:  # the resident tier's earlier rows join the past block for the call
            concat = self.rows * (past + read) * (self.row + VALID_BYTES)
            reading, gathered = 0, 0
        proxy = max(self.rank, PROXY_SCALE_BYTES) if self.int8 else self.rank * self.elem
        widest = self.head_dim * self.elem if not self.offload else proxy
        grown = self.rows * old * widest  # the largest old tensor, alive beside its copy
        host = self.layers * self.tier(rows) if self.offload else 0
        old_host = self.rows * old * self.head_dim * self.elem if self.offload else 0
        return TierMoment(device=device, host=host, host_peak=host + max(old_host, gathered),
                          transient=max(grown, concat + reading), read=read)

    def terms(self, context: int, chunk: int | None, top_k: int, seen: int) -> tuple[Term, ...]:
        """The tier's lines of the memory formula at the end (after ``seen`` tokens)."""
        _, rows = tier_growth(context, chunk, seen)
        ws = working_rows(context, chunk, top_k, seen)
        L, B, H, d, dk, e, r = (self.layers, self.batch, self.kv_heads, self.head_dim, self.key_dim, self.elem,
                                self.rank)
        where = "host memory" if self.offload else "device"
        return (
            Term(f"retrieval tier ({where}): every token's keys and values", "L·B·H_kv·C·(d_k + d)·e, C = rows "
                 "grown exactly per chunk and by max(16, C/16) per full decode step",
                 f"{L}·{B}·{H}·{rows:,}·({dk} + {d})·{e}", L * self.tier(rows)),
            Term("proxy keys and validity (device)", "L·B·H_kv·C·(rank + 4 + 1) (int8 and a float32 scale)"
                 if self.int8 else "L·B·H_kv·C·(rank·e + 1)",
                 f"{L}·{B}·{H}·{rows:,}·({r} + 4 + 1)" if self.int8 else f"{L}·{B}·{H}·{rows:,}·({r}·{e} + 1)",
                 L * self.proxy(rows)),
            Term("working sets (device)", "L·B·H_kv·min(top_k, seen - 1)·((d_k + d)·e + 8)",
                 f"{L}·{B}·{H}·{ws:,}·(({dk} + {d})·{e} + 8)", L * self.working(ws)),
            Term("per-prompt proxy bases (device, lrqk)", "L·B·H_kv·d·rank·e", f"{L}·{B}·{H}·{d}·{r}·{e}",
                 L * self.basis),
        )

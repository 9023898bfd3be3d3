"""The two kinds of policy and the read-only view of a cache layer that they decide from.

A policy only *decides*; the cache owns and writes every tensor. There are two kinds:

- :class:`TokenPolicy` decides which tokens a layer keeps. It states a token ``budget`` and ranks the
  held slots with :meth:`TokenPolicy.priority` (the cache keeps the highest-ranked slots), or it has
  no budget and chooses, with :meth:`TokenPolicy.compact`, which slots to keep and what each stands for.
- :class:`ChannelPolicy` decides which key channels are stored. It maps keys and queries into a
  (possibly rotated) basis and states how many leading channels of the keys the cache stores.

A cache holds at most one policy of each kind, so the two never need to know about each other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model_info import ModelInfo

__all__ = ["ChannelPolicy", "Policy", "SlotView", "TokenPolicy"]


@dataclass(frozen=True)
class SlotView:
    """What a token policy may read about one layer's held slots.

    Every tensor has shape ``(batch, kv_heads, slots)`` unless stated.

    Attributes
    ----------
    index : torch.Tensor
        int32, the cache index of the token in each slot: its rank among all tokens the sequence has
        fed through the cache (0 for the first prompt token, left padding included).
    valid : torch.Tensor
        bool, False for empty slots and padding tokens. The cache never keeps an invalid slot in
        preference to a valid one, whatever the policy says.
    score : torch.Tensor or None
        float32 attention mass each slot has received so far, summed over the query heads of its
        KV group and over every query that attended it (prefill and decode). ``None`` unless the
        policy sets ``needs_scores``.
    seen : int or torch.Tensor
        Tokens seen by the layer so far (the next token's cache index); a 0-d tensor once the cache
        is static (:meth:`kvpress_aqua.core.cache.CompressedCache.make_static`).
    left_pad : torch.Tensor
        int32 of shape ``(batch, 1, 1)``: the number of left-padding tokens of each row, so that
        ``index - left_pad`` is the position among the row's real tokens.
    layer_idx : int
        The decoder layer.
    keys, values : torch.Tensor or None
        ``(batch, kv_heads, slots, key_dim)`` keys as stored (rotated and pruned under AQUA) and
        ``(batch, kv_heads, slots, head_dim)`` values, for policies that choose from them (BalanceKV).
    log_weight : torch.Tensor or None
        float32: how many tokens each slot stands for, as a log (0: itself); ``None`` unless the
        policy sets ``weights_slots``.
    heads : range or None
        Which of the model's KV heads the ``kv_heads`` axis holds (a tensor-parallel rank's share),
        out of ``num_heads``; ``None``: all of them. Random policies draw for every head and keep
        these, so a head chooses the same tokens whichever rank holds it.
    num_heads : int or None
        The model's KV heads (with ``heads``).

    """

    index: torch.Tensor
    valid: torch.Tensor
    score: torch.Tensor | None
    seen: int | torch.Tensor
    left_pad: torch.Tensor
    layer_idx: int
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    log_weight: torch.Tensor | None = None
    heads: range | None = None
    num_heads: int | None = None


class TokenPolicy(ABC):
    """Decides which tokens a layer keeps (eviction).

    Subclasses are dataclasses whose fields are their knobs. Two ways to decide:

    - by rank, with a token ``budget``: the cache evicts down to ``budget`` held tokens, keeping the
      highest :meth:`priority`; a decode step holds ``budget + 1`` slots (the budget plus the new
      token) and a prefill chunk of ``n`` tokens ``budget + n``;
    - by choice, with ``budget`` ``None``: after each attention call the cache asks :meth:`compact`
      which slots to keep and what each kept slot now stands for (a log-weight the attention adds
      to its score), as often as it answers (BalanceKV, uniform sampling: summaries of blocks).
    """

    needs_scores: bool = False
    """Whether :meth:`priority` reads ``SlotView.score`` (makes the cache keep a float32 score per slot)."""

    score_decay: float = 1.0
    """Factor applied to the held scores before each attention call adds its mass: 1 accumulates over
    every query seen (H2O), 0 keeps only the latest call's queries (TOVA)."""

    weights_slots: bool = False
    """Whether kept slots stand for several tokens (makes the cache keep a float32 log-weight per slot)."""

    score_rows: int | None = None
    """Only the last ``score_rows`` queries of each attention call give scores (an observation window);
    ``None``: every query does."""

    retrieves: bool = False
    """Whether the layer also keeps every token in a second tier that its attention retrieves from
    (:class:`~kvpress_aqua.policies.retrieval.Retrieval`): the cache then builds the tier."""

    @property
    @abstractmethod
    def budget(self) -> int | None:
        """Tokens kept per layer, KV head and sequence after eviction; ``None`` if :meth:`compact` chooses."""

    def compact(self, view: SlotView) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The slots to keep now and their new log-weights, or ``None`` (nothing to do).

        Parameters
        ----------
        view : SlotView
            The layer's slots, keys and values included.

        Returns
        -------
        tuple or None
            int64 ``(batch, kv_heads, k)`` slots to keep, ascending, the same count ``k`` in every
            row, and float32 ``(batch, kv_heads, k)`` log-weights of the kept slots (``None``: the
            policy keeps no weights); ``None`` when the policy keeps everything for now.

        """
        return None

    def priority(self, view: SlotView) -> torch.Tensor:
        """Rank the held slots; higher is kept first (policies with a ``budget`` define it).

        Parameters
        ----------
        view : SlotView
            The layer's slots.

        Returns
        -------
        torch.Tensor
            float32 of shape ``(batch, kv_heads, slots)``. ``+inf`` marks slots that must be kept.

        """
        raise NotImplementedError(f"{type(self).__name__} has no token budget: it chooses by compact(), not by rank")

    def check(self, info: ModelInfo) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` if the policy cannot work on this model; called when a cache is built."""

    def tensors(self) -> list[torch.Tensor]:
        """The policy's own tensors (retrieval's calibrated proxy bases), each where it lives now; none by default."""
        return []

    def nbytes(self) -> int:
        """Bytes of the policy's own tensors (:meth:`tensors`)."""
        return sum(t.nbytes for t in self.tensors())

    def prepare(self, info: ModelInfo, device: torch.device, dtype: torch.dtype,  # noqa: B027 - optional hook
                key_dims: Sequence[int], exact_tokens: int = 0, heads: range | None = None) -> None:
        """Bind per-model state once the cache knows each layer's stored key width; called when a cache is built.

        Parameters
        ----------
        info : ModelInfo
            The model's attention shapes.
        device, dtype : torch.device, torch.dtype
            Where per-layer tensors go until :meth:`place` moves them, and the model's dtype.
        key_dims : sequence of int
            The stored key width of each layer (the channel policy's; ``head_dim`` without one).
        exact_tokens : int
            The channel policy's exact tokens per layer and KV head (0 without pruning).
        heads : range, optional
            The KV heads this process holds (a tensor-parallel rank's share); ``None``: all of them.

        """

    def place(self, layer_idx: int, device: torch.device) -> None:  # noqa: B027 - optional hook
        """Move a layer's tensors to ``device``, where its keys arrive (the cache calls it at its first update)."""


class ChannelPolicy(ABC):
    """Decides which key channels are stored.

    Keys are projected per layer and KV head onto ``key_dim`` channels by :meth:`project_keys`
    (for AQUA: rotated by an orthogonal basis and cut to the leading channels) and stored in that
    form; the attention projects queries by the same :meth:`key_basis` before they meet stored keys.
    The chunk being processed attends to itself with raw queries and keys, so only stored keys are
    approximated. With an orthogonal basis and every channel kept, attention is exact.

    A policy may also ask the cache to keep the channels it drops for a few tokens: the first
    ``exact_sinks`` real tokens of each sequence and the ``exact_recent`` tokens before the current
    chunk. The cache stores their :meth:`residual_keys`, and the attention adds the score of the
    queries projected by :meth:`residual_basis` against them, which makes attention to them exact.
    """

    exact_sinks: int = 0
    """First real tokens of each sequence whose dropped key channels are kept too."""

    exact_recent: int = 0
    """Most recent tokens (before the current chunk) whose dropped key channels are kept too."""

    @abstractmethod
    def bind(self, info: ModelInfo, device: torch.device, dtype: torch.dtype, heads: range | None = None) -> None:
        """Prepare per-layer state (projection matrices) for a model; called once per cache.

        Parameters
        ----------
        info : ModelInfo
            The model's attention shapes (all of its KV heads).
        device, dtype : torch.device, torch.dtype
            Where the tensors go until :meth:`place` moves a layer's, and their dtype.
        heads : range, optional
            The KV heads this process holds (a tensor-parallel rank's share); ``None``: all of them.
            Per-head tensors keep these heads only, in this order.

        """

    def place(self, layer_idx: int, device: torch.device) -> None:  # noqa: B027 - optional hook
        """Move a layer's tensors to ``device``, where its keys arrive; the cache calls it at the layer's first update.

        A model split over devices (``device_map``) runs each layer on its own device; a policy
        without per-layer tensors has nothing to move.
        """

    @abstractmethod
    def key_dim(self, layer_idx: int) -> int:
        """Number of key channels stored for a layer."""

    @abstractmethod
    def key_basis(self, layer_idx: int) -> torch.Tensor:
        """``(kv_heads, head_dim, key_dim)``: keys and queries are stored and read as ``x @ basis``.

        Under GQA query head ``h`` uses the basis of KV head ``h // (heads // kv_heads)``.
        """

    @abstractmethod
    def residual_basis(self, layer_idx: int) -> torch.Tensor:
        """``(kv_heads, head_dim, head_dim - key_dim)``: the directions :meth:`key_basis` drops.

        ``(q @ key_basis)·(k @ key_basis) + (q @ residual_basis)·(k @ residual_basis)`` is ``q · k``
        for an orthogonal basis. Needed only when the policy keeps exact tokens.
        """

    def query_channels(self, layer_idx: int) -> int | None:
        """Channels of each projected query kept, by magnitude (per-query selection); ``None`` keeps all."""
        return None

    def project_keys(self, layer_idx: int, keys: torch.Tensor) -> torch.Tensor:
        """Map keys ``(batch, kv_heads, seq, head_dim)`` to their stored form ``(batch, kv_heads, seq, key_dim)``."""
        return keys @ self.key_basis(layer_idx)

    def residual_keys(self, layer_idx: int, keys: torch.Tensor) -> torch.Tensor:
        """The channels :meth:`project_keys` drops: ``(batch, kv_heads, seq, head_dim - key_dim)``."""
        return keys @ self.residual_basis(layer_idx)

    @abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """The policy's own tensors (projection matrices), each where it lives now."""

    def nbytes(self) -> int:
        """Bytes of the policy's own tensors (projection matrices) held on the device."""
        return sum(t.nbytes for t in self.tensors())


Policy = TokenPolicy | ChannelPolicy

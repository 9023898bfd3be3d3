"""TOVA: evict the token the latest queries attend to least."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import SlotView
from .h2o import H2O


@dataclass
class TOVA(H2O):
    """Keep the ``heavy`` tokens the latest queries attend to most, plus ``recent`` newest and ``sinks`` first ones.

    Based on "Transformers are Multi-State RNNs" (Oren et al., 2024, https://arxiv.org/abs/2401.06104),
    whose Token Omission Via Attention drops, at every step, the token with the lowest attention from
    the current query. Unlike :class:`~kvpress_aqua.policies.H2O` nothing accumulates: each attention
    call replaces the scores (``score_decay = 0``).

    The knobs, their checks and the protected tokens are :class:`~kvpress_aqua.policies.H2O`'s; only
    the score memory and the ranking differ.

    Parameters
    ----------
    heavy : int
        Tokens kept for the attention the latest queries gave them.
    recent : int
        Most recent tokens always kept.
    sinks : int, default 0
        First real tokens of each sequence always kept.

    Notes
    -----
    Scores, shape ``(batch, kv_heads, slots)``, are the attention weights the slots received in the
    layer's latest attention call, summed over the queries of that call and over the query heads of
    a KV group (one set of tokens per KV head). In decoding that is the current token's query, as in
    the paper. In chunked prefill it is the whole chunk's queries, so with the question at the end of
    the prompt the last eviction before answering is guided by the question (the query-aware
    protocol of the needle harness).
    Known limitations: a token of the latest chunk is seen only by the chunk's later queries, so it
    scores lower than one seen by all of them (the ``recent`` window protects the newest); an evicted
    token never returns; the paper keeps no recent window and uses no sinks (set both to 0 for it).

    """

    score_decay = 0.0

    def priority(self, view: SlotView) -> torch.Tensor:
        """Attention from the latest queries; recent tokens and sinks always kept."""
        return view.score.masked_fill(self.protected(view), float("inf"))

"""H2O: keep heavy hitters (tokens with the most accumulated attention) plus recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import SlotView, TokenPolicy


@dataclass
class H2O(TokenPolicy):
    """Keep the ``heavy`` tokens with the most attention, the ``recent`` newest and ``sinks`` first ones.

    Based on "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
    (Zhang et al., 2023, https://arxiv.org/abs/2306.14048).

    Parameters
    ----------
    heavy : int
        Tokens kept for their accumulated attention.
    recent : int
        Most recent tokens always kept.
    sinks : int, default 0
        First real tokens of each sequence always kept.

    Notes
    -----
    Scores, shape ``(batch, kv_heads, slots)``, are the attention weights each slot received,
    accumulated at prefill and at every decode step from the attention actually computed (so under
    AQUA they are those of the approximate attention). Under GQA the weights of all query heads of a
    KV group are summed, so each KV head keeps one set of tokens for its whole group. The ranking
    divides the accumulated mass by the number of queries that could attend the slot
    (``seen - index``): raw sums favour old tokens merely for having been seen longer, which sent
    SmolLM2 into repetition loops in our prototype.

    Known limitations: the choice is local to each decoding step (an evicted token never returns),
    and at prefill the scores come from the chunk's own queries, so with a query-last prompt the
    question has not been read yet when the context is compressed (see the needle harness's
    context-first protocol).

    """

    heavy: int
    recent: int
    sinks: int = 0
    needs_scores = True

    def __post_init__(self) -> None:
        kind = type(self).__name__
        for name in ("heavy", "recent", "sinks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{kind}({name}={getattr(self, name)}): must be >= 0")
        if self.budget <= 0:
            raise ValueError(f"{kind}(heavy=0, recent=0, sinks=0) keeps nothing; give heavy or recent > 0")

    @property
    def budget(self) -> int:
        """``heavy + recent + sinks``."""
        return self.heavy + self.recent + self.sinks

    def priority(self, view: SlotView) -> torch.Tensor:
        """Mean attention per query that could see the slot; recent tokens and sinks always kept."""
        mean_mass = view.score / (view.seen - view.index).clamp_min(1)
        return mean_mass.masked_fill(self.protected(view), float("inf"))

    def protected(self, view: SlotView) -> torch.Tensor:
        """Bool ``(batch, kv_heads, slots)``: the ``sinks`` first real tokens and the ``recent`` newest."""
        return (view.index - view.left_pad < self.sinks) | (view.index >= view.seen - self.recent)

"""SnapKV: keep the tokens an observation window of the latest queries attends to, pooled over neighbours."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import SlotView, TokenPolicy


@dataclass
class SnapKV(TokenPolicy):
    """Keep the ``heavy`` tokens the last ``window`` queries attend to most (pooled), the window itself and ``sinks``.

    Based on "SnapKV: LLM Knows What You are Looking for Before Generation" (Li et al., 2024,
    https://arxiv.org/abs/2404.14469): the queries at the end of a prompt (the observation window)
    already attend to what the answer will need, so the attention they give, summed over the window
    and smoothed by a 1-d pooling over neighbouring positions (whole phrases rather than single
    tokens), ranks the rest of the prompt.

    Parameters
    ----------
    heavy : int
        Tokens kept for the window's pooled attention.
    window : int, default 32
        The observation window: the last queries of each attention call that give scores; also the
        newest tokens, always kept.
    sinks : int, default 0
        First real tokens of each sequence always kept.
    kernel : int, default 7
        Width of the average pooling over positions (odd).

    Notes
    -----
    Scores, shape ``(batch, kv_heads, slots)``, are the attention weights of the last ``window``
    queries of the layer's latest attention call (``score_decay = 0``), summed over the query heads
    of a KV group. Budget: ``heavy + window + sinks`` per layer, KV head and sequence.
    Known limits: the paper compresses once, after the prompt; here each prefill chunk's window
    ranks the tokens when that chunk overfills the budget, and a decode step ranks by its own single
    query (then the policy behaves like a pooled TOVA). With the question at the end of a prompt
    read in one chunk this is the paper's setting; with chunked prefill the early chunks are
    compressed before the question is read.

    """

    heavy: int
    window: int = 32
    sinks: int = 0
    kernel: int = 7
    needs_scores = True
    score_decay = 0.0

    def __post_init__(self) -> None:
        for name in ("heavy", "sinks"):
            if getattr(self, name) < 0:
                raise ValueError(f"SnapKV({name}={getattr(self, name)}): must be >= 0")
        if self.window < 1:
            raise ValueError(f"SnapKV(window={self.window}): the observation window needs at least one query")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"SnapKV(kernel={self.kernel}): the pooling width must be odd and positive")

    @property
    def budget(self) -> int:
        """``heavy + window + sinks``."""
        return self.heavy + self.window + self.sinks

    @property
    def score_rows(self) -> int:
        """The observation window: only its queries give scores."""
        return self.window

    def priority(self, view: SlotView) -> torch.Tensor:
        """The window's attention averaged over ``kernel`` neighbouring positions; window and sinks always kept."""
        order = view.index.argsort(dim=-1)  # decode buffers hold slots out of position order
        valid = view.valid.gather(-1, order).float()
        ranked = view.score.gather(-1, order) * valid

        def pool(x: torch.Tensor) -> torch.Tensor:
            return F.avg_pool1d(x.flatten(0, 1)[:, None], self.kernel, stride=1, padding=self.kernel // 2)[:, 0]

        pooled = (pool(ranked) / pool(valid).clamp_min(1e-12)).view_as(ranked)  # the mean over held neighbours
        rank = torch.empty_like(pooled).scatter_(-1, order, pooled)
        protected = (view.index - view.left_pad < self.sinks) | (view.index >= view.seen - self.window)
        return rank.masked_fill(protected, float("inf"))

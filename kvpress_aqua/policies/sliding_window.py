"""StreamingLLM: keep the first tokens (attention sinks) and a window of the most recent ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import SlotView, TokenPolicy

__all__ = ["SlidingWindow", "recency_priority"]


def recency_priority(view: SlotView, sinks: int) -> torch.Tensor:
    """Newer is kept first, the first ``sinks`` real tokens always (``+inf``): ``(batch, kv_heads, slots)``."""
    is_sink = (view.index - view.left_pad) < sinks
    return view.index.float().masked_fill(is_sink, float("inf"))


@dataclass
class SlidingWindow(TokenPolicy):
    """Keep ``sinks`` first tokens and the ``window`` most recent ones.

    Based on StreamingLLM, "Efficient Streaming Language Models with Attention Sinks"
    (Xiao et al., 2023, https://arxiv.org/abs/2309.17453).

    Parameters
    ----------
    sinks : int, default 4
        First real tokens of each sequence kept forever (left padding is not counted).
    window : int, default 1020
        Most recent tokens kept.

    Notes
    -----
    The ranking reads only slot indices ``(batch, kv_heads, slots)``, so every KV head keeps the same
    tokens. Budget: ``sinks + window`` tokens per layer, KV head and sequence.

    Known limitation: anything outside the window is gone for good, so a fact stated early in a long
    prompt cannot be recalled unless it falls in the sinks.

    """

    sinks: int = 4
    window: int = 1020

    def __post_init__(self) -> None:
        if self.sinks < 0:
            raise ValueError(f"SlidingWindow(sinks={self.sinks}): sinks must be >= 0")
        if self.window <= 0:
            raise ValueError(f"SlidingWindow(window={self.window}): window must be a positive token count")

    @property
    def budget(self) -> int:
        """``sinks + window``."""
        return self.sinks + self.window

    def priority(self, view: SlotView) -> torch.Tensor:
        """Newer is kept first; sinks always."""
        return recency_priority(view, self.sinks)

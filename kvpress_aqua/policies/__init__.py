"""Policies: what to keep. Token policies rank slots for eviction; channel policies prune key channels.

The classes are loaded on first use (PEP 562), so that :mod:`kvpress_aqua.policies.registry` (the
policy names, kinds and defaults the planner and the spec parser read) imports without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..util.lazy import lazy_exports

_EXPORTS = {
    "Aqua": "aqua",
    "BalanceKV": "balancekv",
    "BlockSummary": "blocks",
    "ChannelPolicy": "base",
    "H2O": "h2o",
    "Retrieval": "retrieval",
    "SlidingWindow": "sliding_window",
    "SlotView": "base",
    "SnapKV": "snapkv",
    "TOVA": "tova",
    "TokenPolicy": "base",
    "Uniform": "uniform",
}
"""Public name -> the module defining it."""

__all__ = [
    "H2O", "TOVA", "Aqua", "BalanceKV", "BlockSummary", "ChannelPolicy", "Retrieval", "SlidingWindow", "SlotView",
    "SnapKV", "TokenPolicy", "Uniform",
]

if TYPE_CHECKING:
    from .aqua import Aqua
    from .balancekv import BalanceKV
    from .base import ChannelPolicy, SlotView, TokenPolicy
    from .blocks import BlockSummary
    from .h2o import H2O
    from .retrieval import Retrieval
    from .sliding_window import SlidingWindow
    from .snapkv import SnapKV
    from .tova import TOVA
    from .uniform import Uniform


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

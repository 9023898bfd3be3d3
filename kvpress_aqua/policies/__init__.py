"""Policies: what to keep. Token policies rank slots for eviction; channel policies prune key channels.

The classes are loaded on first use (PEP 562), so that :mod:`kvpress_aqua.policies.registry` (the
policy names, kinds and defaults the planner and the spec parser read) imports without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..util.lazy import lazy_exports

_EXPORTS = {
    "Aqua": "aqua",
    "ChannelPolicy": "base",
    "H2O": "h2o",
    "SlidingWindow": "sliding_window",
    "SlotView": "base",
    "TOVA": "tova",
    "TokenPolicy": "base",
}
"""Public name -> the module defining it."""

__all__ = ["Aqua", "ChannelPolicy", "H2O", "SlidingWindow", "SlotView", "TOVA", "TokenPolicy"]

if TYPE_CHECKING:
    from .aqua import Aqua
    from .base import ChannelPolicy, SlotView, TokenPolicy
    from .h2o import H2O
    from .sliding_window import SlidingWindow
    from .tova import TOVA


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

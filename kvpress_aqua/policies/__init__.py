"""Policies: what to keep. Token policies rank slots for eviction; channel policies prune key channels."""

from .base import ChannelPolicy, SlotView, TokenPolicy
from .h2o import H2O
from .sliding_window import SlidingWindow

__all__ = ["H2O", "ChannelPolicy", "SlidingWindow", "SlotView", "TokenPolicy"]

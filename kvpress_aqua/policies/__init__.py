"""Policies: what to keep. Token policies rank slots for eviction; channel policies prune key channels."""

from .base import ChannelPolicy, SlotView, TokenPolicy
from .h2o import H2O
from .sliding_window import SlidingWindow
from .tova import TOVA

__all__ = ["H2O", "TOVA", "ChannelPolicy", "SlidingWindow", "SlotView", "TokenPolicy"]

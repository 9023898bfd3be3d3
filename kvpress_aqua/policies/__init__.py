"""Policies: what to keep. Token policies rank slots for eviction; channel policies prune key channels.

The classes are loaded on first use (PEP 562), so that :mod:`kvpress_aqua.policies.registry` (the
policy names, kinds and defaults the planner and the spec parser read) imports without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    """Import the module defining the public ``name`` on first access."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names and the public names not loaded yet."""
    return sorted(set(globals()) | set(_EXPORTS))

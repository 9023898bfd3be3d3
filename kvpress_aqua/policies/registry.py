"""Policy defaults the planner shares with the runtime, importable without torch.

The runtime policies (:class:`kvpress_aqua.policies.aqua.Aqua`) take their defaults from here, so the
planner and the calibration sweep read the same numbers without importing the policies (torch).
"""

from __future__ import annotations

from typing import Any

__all__ = ["AQUA_EXACT_RECENT", "AQUA_EXACT_SINKS", "DEFAULT_SINKS", "token_entry"]

AQUA_EXACT_SINKS = 4
"""``Aqua.exact_sinks`` by default: the first tokens of a sequence that keep every key channel."""
AQUA_EXACT_RECENT = 64
"""``Aqua.exact_recent`` by default: the most recent tokens that keep every key channel."""
DEFAULT_SINKS = 4
"""Sinks given to token policies sized by a budget (the value of :data:`kvpress_aqua.spec.DEFAULT_SINKS`)."""


def token_entry(kind: str, budget: int, max_sinks: int = DEFAULT_SINKS) -> dict[str, Any]:
    """The token-policy entry for a budget, split as in the shipped presets.

    Parameters
    ----------
    kind : {"h2o", "sliding"}
        ``h2o``: ``DEFAULT_SINKS`` sinks, the rest half heavy hitters and half recent tokens;
        ``sliding``: the sinks and a window.
    budget : int
        Tokens kept per layer, KV head and sequence.
    max_sinks : int
        Cap on the sinks (a model's own sliding window minus one).

    Returns
    -------
    dict
        A :class:`~kvpress_aqua.spec.PolicySpec` entry.

    """
    sinks = max(0, min(DEFAULT_SINKS, budget - 1, max_sinks))
    rest = budget - sinks
    if kind == "sliding":
        return {"type": "sliding", "sinks": sinks, "window": rest}
    recent = rest // 2
    return {"type": "h2o", "heavy": rest - recent, "recent": recent, "sinks": sinks}

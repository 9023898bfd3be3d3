"""Block summaries in the planner: BalanceKV and uniform sampling, sized by their ``halvings``.

A block-summary policy (:class:`~kvpress_aqua.policies.blocks.BlockSummary`) has no token budget:
it keeps ``sinks`` first and ``recent`` newest tokens whole and reduces every full block of
``block`` middle tokens to ``block / 2**halvings`` of them, each standing for ``2**halvings``
(a float32 log-weight per slot). The planner sizes it by its rate: the knob it searches is
``halvings`` (1, 2, ... :data:`MAX_HALVINGS`), the other knobs stay at the policies' defaults
(:data:`SUMMARY_KNOBS`, which the emitted preset states), and a layer holds
:func:`summary_slots` slots after ``t`` tokens.

The planner imports no torch, so these defaults and the slot count are written here; the tests
hold them equal to the policy classes' (``BlockSummary.held`` and the dataclass defaults).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

__all__ = [
    "MAX_HALVINGS",
    "SUMMARY_KNOBS",
    "SUMMARY_POLICIES",
    "halvings_text",
    "last_starts",
    "maximal",
    "summary_entry",
    "summary_slots",
]

SUMMARY_POLICIES = ("balancekv", "uniform")
"""The registry's block-summary policies (token rows without a budget ``split`` that the planner sizes by rate)."""
SUMMARY_KNOBS: Mapping[str, int] = MappingProxyType({"sinks": 32, "recent": 32, "block": 128})
"""The knobs a plan keeps at the policies' defaults (``BalanceKV()`` and ``Uniform()`` alike)."""
MAX_HALVINGS = SUMMARY_KNOBS["block"].bit_length() - 1
"""Most halvings planned: a block of 128 reduced to one token (``block`` must stay a multiple of ``2**halvings``)."""


def summary_slots(tokens: int, halvings: int) -> int:
    """Slots one layer holds per sequence and KV head once ``tokens`` tokens were fed and its full blocks reduced.

    ``sinks + recent`` tokens, the pending middle tokens (fewer than a block) and
    ``block / 2**halvings`` slots per full block: ``BlockSummary.held`` with :data:`SUMMARY_KNOBS`.
    """
    sinks, recent, block = SUMMARY_KNOBS["sinks"], SUMMARY_KNOBS["recent"], SUMMARY_KNOBS["block"]
    full = max(0, tokens - sinks - recent) // block if halvings else 0
    return tokens - full * (block - (block >> halvings))


def summary_entry(token_policy: str, halvings: int) -> dict[str, Any]:
    """The spec entry of a block summary planned at ``halvings``: its type, the halvings and :data:`SUMMARY_KNOBS`."""
    return {"type": token_policy, "halvings": halvings, **SUMMARY_KNOBS}


def halvings_text(halvings: int, held: int, seen: int) -> str:
    """``"halvings 2 (1/4 of the middle: 1,234 of 4,096 tokens held)"``."""
    return f"halvings {halvings} (1/{2 ** halvings} of the middle: {held:,} of {seen:,} tokens held)"


def last_starts(first: int, step: int, count: int) -> range:
    """Of the ``count`` starts ``first, first + step, ...``, those at which a layer can hold the most.

    A layer holds ``h(t) = summary_slots(t, halvings)`` after ``t`` tokens, and
    ``h(t + P) >= h(t)`` for every ``P`` that is a multiple of the block (``P`` later, ``P / block``
    more blocks are reduced and the rest is the same; before the first block the count only grows).
    So a step starting at ``x`` holds no more, before and after it, than the one starting at
    ``x + lcm(step, block)``: only the last ``block / gcd(step, block)`` starts can hold the most.
    """
    keep = SUMMARY_KNOBS["block"] // math.gcd(step, SUMMARY_KNOBS["block"])
    return range(first + max(0, count - keep) * step, first + count * step, step)


def maximal(pairs: Iterable[tuple[int, int, Any]]) -> list[Any]:
    """The payloads of the pairs ``(a, b, payload)`` that no other pair beats on both ``a`` and ``b``.

    A phase's bytes grow with both the slots its attending layer held before it and the slots the
    other layers hold, so only these pairs can be the peak.
    """
    kept, best_b = [], None
    for _, b, payload in sorted(pairs, key=lambda p: (-p[0], -p[1])):
        if best_b is None or b > best_b:
            kept.append(payload)
            best_b = b
    return kept

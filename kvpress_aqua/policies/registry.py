"""The one registry of policy types: names, kinds and budget splits, importable without torch.

Every policy type the spec parser, the planner and the calibration sweep know is one
:class:`PolicyType` row of :data:`POLICY_TYPES`: its canonical name and aliases, where its class
lives (loaded on demand with :mod:`importlib`, so that reading the registry never imports torch),
its kind (``"token"`` or ``"channel"``), whether it reads attention scores, and how a token budget
splits into its knobs (:meth:`PolicyType.split_budget`, the one split used by relative sizes
``kv_fraction = ...``, by the planner's entries and by the sweep). The runtime policies take the
defaults torch-free code needs from here (``Aqua.exact_sinks``, ``Aqua.exact_recent``), and
``tests/test_policy_registry.py`` holds every row equal to its class.

A new policy is its module under :mod:`kvpress_aqua.policies`, one row here and one row in that test.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "AQUA_EXACT_RECENT",
    "AQUA_EXACT_SINKS",
    "AQUA_K_RATIO",
    "DEFAULT_SINKS",
    "KINDS",
    "POLICY_TYPES",
    "PolicyType",
    "policy_names",
    "policy_type",
    "token_entry",
    "token_policy_names",
]

AQUA_K_RATIO = 0.5
"""``Aqua.k_ratio`` by default: the fraction of key channels kept."""
AQUA_EXACT_SINKS = 4
"""``Aqua.exact_sinks`` by default: the first tokens of a sequence that keep every key channel."""
AQUA_EXACT_RECENT = 64
"""``Aqua.exact_recent`` by default: the most recent tokens that keep every key channel."""
DEFAULT_SINKS = 4
"""Sinks given to token policies sized by a budget (relative sizes, the planner, the sweep)."""

KINDS = ("token", "channel")
"""``token``: decides which tokens a layer keeps (``TokenPolicy``); ``channel``: which key channels are stored
(``ChannelPolicy``)."""


@dataclass(frozen=True)
class PolicyType:
    """One policy type: what the spec parser, the planner and the sweep know without loading its class.

    Attributes
    ----------
    name : str
        Canonical name (``type = ...`` in specs, content keys, emitted presets).
    module : str
        Module defining the class, relative to :mod:`kvpress_aqua.policies` (``"h2o"``).
    class_name : str
        The class in that module (``"H2O"``).
    kind : {"token", "channel"}
        The base class: ``TokenPolicy`` or ``ChannelPolicy``.
    needs_scores : bool
        Whether the policy reads attention scores (the cache then keeps a float32 score per slot).
    aliases : tuple of str
        Other accepted names (``streaming`` for ``sliding``).
    split : tuple of str
        Token policies with a budget: the knobs a token budget beyond the ``sinks`` is split into,
        evenly, the remainder to the first (:meth:`split_budget`); these are the knobs
        ``kv_fraction`` computes. Empty for a policy that keeps a rate rather than a budget
        (block summaries: BalanceKV, uniform sampling) and for channel policies.
    sizes_itself : bool
        The policy turns ``kv_fraction`` into its knobs itself once the cache knows the model (the
        spec passes it the fraction and the context): retrieval, whose bytes include a proxy of
        every token and depend on the head width.
    defaults : Mapping
        Knob defaults that torch-free code reads (AQUA's ``k_ratio`` and exact tokens); equal to the
        dataclass defaults (the contract test checks).

    """

    name: str
    module: str
    class_name: str
    kind: str
    needs_scores: bool = False
    aliases: tuple[str, ...] = ()
    split: tuple[str, ...] = ()
    sizes_itself: bool = False
    defaults: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"policy type {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.kind != "token" and self.split:
            raise ValueError(f"policy type {self.name!r}: only token policies split a budget")

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical name and the aliases."""
        return (self.name, *self.aliases)

    def load(self) -> type:
        """The policy class, importing its module (and torch) on first use."""
        return getattr(importlib.import_module(f"{__package__}.{self.module}"), self.class_name)

    def split_budget(self, budget: int, sinks: int = DEFAULT_SINKS) -> dict[str, int]:
        """The knobs of a token budget: ``sinks`` (at most ``budget - 1``), the rest split over :attr:`split`.

        Parameters
        ----------
        budget : int
            Tokens kept per layer, KV head and sequence (at least 1).
        sinks : int
            Sinks wanted; capped at ``budget - 1`` so that something else is kept. A negative
            count is passed on for the policy's own check to refuse.

        Returns
        -------
        dict
            ``{"sinks": ..., knob: ...}``: for ``sliding`` the window, for ``h2o`` and ``tova``
            half heavy hitters and half recent tokens (the odd token to the heavy hitters).

        Raises
        ------
        ValueError
            For a channel policy (no token budget) or a budget below 1.

        """
        if not self.split:
            what = "a channel policy" if self.kind == "channel" else "a token policy without a budget (it keeps a rate)"
            raise ValueError(f"{self.name} is {what}: it takes no token budget")
        if budget < 1:
            raise ValueError(f"{self.name}: a token budget must be at least 1, got {budget}")
        sinks = min(sinks, budget - 1)
        rest = budget - sinks
        share, first = rest // len(self.split), rest % len(self.split)
        knobs = {name: share for name in self.split}
        knobs[self.split[0]] += first
        return {**knobs, "sinks": sinks}


POLICY_TYPES: dict[str, PolicyType] = {
    row.name: row
    for row in (
        PolicyType("h2o", "h2o", "H2O", "token", needs_scores=True, split=("heavy", "recent")),
        PolicyType("tova", "tova", "TOVA", "token", needs_scores=True, split=("heavy", "recent")),
        PolicyType("sliding", "sliding_window", "SlidingWindow", "token", aliases=("streaming",), split=("window",)),
        PolicyType("snapkv", "snapkv", "SnapKV", "token", needs_scores=True, split=("window", "heavy")),
        PolicyType("balancekv", "balancekv", "BalanceKV", "token"),
        PolicyType("uniform", "uniform", "Uniform", "token"),
        PolicyType("retrieval", "retrieval", "Retrieval", "token", sizes_itself=True),
        PolicyType("aqua", "aqua", "Aqua", "channel", defaults=MappingProxyType({
            "k_ratio": AQUA_K_RATIO, "exact_sinks": AQUA_EXACT_SINKS, "exact_recent": AQUA_EXACT_RECENT})),
    )
}
"""Canonical name -> row, for every shipped policy."""

_BY_NAME = {name: row for row in POLICY_TYPES.values() for name in row.names}


def policy_names(kind: str | None = None) -> tuple[str, ...]:
    """Every accepted name (aliases included), sorted; only those of one ``kind`` if given."""
    return tuple(sorted(n for n, row in _BY_NAME.items() if kind is None or row.kind == kind))


def token_policy_names() -> tuple[str, ...]:
    """The canonical names of the token policies with a budget, sorted (what a token budget can size)."""
    return tuple(sorted(n for n, row in POLICY_TYPES.items() if row.kind == "token" and row.split))


def policy_type(name: str, kind: str | None = None) -> PolicyType:
    """The row of a policy name or alias (case-insensitive).

    Parameters
    ----------
    name : str
        ``"h2o"``, ``"streaming"``, ``"AQUA"``...
    kind : {"token", "channel"}, optional
        Refuse the other kind.

    Raises
    ------
    ValueError
        For an unknown name or one of the other kind, listing the accepted names.

    """
    row = _BY_NAME.get(str(name).strip().lower())
    if row is None or (kind is not None and row.kind != kind):
        what = "policy type" if kind is None else f"{kind} policy"
        raise ValueError(f"unknown {what} {name!r}; use one of {', '.join(policy_names(kind))}")
    return row


def token_entry(kind: str, budget: int, max_sinks: int = DEFAULT_SINKS) -> dict[str, Any]:
    """The spec entry of a token policy keeping ``budget`` tokens, split by :meth:`PolicyType.split_budget`.

    Parameters
    ----------
    kind : str
        A token policy name (``h2o``, ``tova``, ``sliding``...).
    budget : int
        Tokens kept per layer, KV head and sequence.
    max_sinks : int
        Cap on the :data:`DEFAULT_SINKS` sinks (a model's own sliding window minus one).

    Returns
    -------
    dict
        A :class:`~kvpress_aqua.presets.spec.PolicySpec` entry, ``{"type": canonical name, knob: value}``.

    """
    row = policy_type(kind, "token")
    return {"type": row.name, **row.split_budget(budget, min(DEFAULT_SINKS, max_sinks))}

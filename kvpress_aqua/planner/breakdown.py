"""What the memory model predicts for one plan point: :class:`Breakdown`, and the lines of its formula (:class:`Term`).

:class:`~kvpress_aqua.planner.memory.MemoryModel` builds them (its docstring has the formula);
:mod:`kvpress_aqua.planner.search` re-exports both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

__all__ = ["Breakdown", "Term", "combine"]


@dataclass(frozen=True)
class Term:
    """One line of the memory formula: symbols, the numbers substituted, and the bytes."""

    name: str
    formula: str
    numbers: str
    nbytes: int


@dataclass(frozen=True)
class Breakdown:
    """Predicted bytes of one plan point.

    Attributes
    ----------
    weights, projections, overhead : int
        Model weights, AQUA projection matrices, runtime overhead.
    kv : int
        KV held on the device at the end (keys, values, slot metadata; a retrieval cache's proxy
        keys, working sets and bases too): ``cache.nbytes() - projections``.
    peak_kv, attention, activations, copy : int
        KV held, attention scores (0 when a layer's MLP step needs more than its attention step),
        activations and one layer's copy in the peak phase.
    max_kv : int
        The most KV the cache holds on the device at any moment checked (every phase, and the end):
        what a KV-cache budget (``plan(budget=...)``) bounds, with the projections (:attr:`cache_peak`).
    peak_phase : str
        ``"prefill"`` or ``"decode"``.
    terms : tuple of Term
        The formula with numbers substituted (:meth:`Plan.explain`).
    host : int
        A retrieval cache's tier in host memory at the end (``cache.nbytes("host")``); 0 otherwise.
    host_peak : int
        The most the host tier holds at once (a growing tier's old and new tensors while it is
        copied): what a host budget (``plan(host_budget=...)``) bounds.

    """

    weights: int
    kv: int
    projections: int
    peak_kv: int
    attention: int
    activations: int
    copy: int
    overhead: int
    peak_phase: str
    max_kv: int
    terms: tuple[Term, ...] = field(repr=False)
    host: int = 0
    host_peak: int = 0
    devices: tuple[Breakdown, ...] = field(default=(), repr=False)

    @property
    def device_cache_peak(self) -> int:
        """The KV cache at its largest on the most loaded device: what a per-GPU KV budget bounds."""
        return max((d.cache_peak for d in self.devices), default=self.cache_peak)

    @property
    def device_total(self) -> int:
        """The predicted peak of the most loaded device: what the (per-GPU) device memory bounds."""
        return max((d.total for d in self.devices), default=self.total)

    @property
    def busiest(self) -> Breakdown:
        """The device with the largest peak (this breakdown itself for one device)."""
        return max(self.devices, key=lambda d: d.total, default=self)

    @property
    def cache_bytes(self) -> int:
        """What ``CompressedCache.nbytes()`` measures at the end: KV plus projection matrices (device only)."""
        return self.kv + self.projections

    @property
    def cache_peak(self) -> int:
        """The most the cache holds on the device at once: KV at its largest (:attr:`max_kv`) plus projections."""
        return self.max_kv + self.projections

    @property
    def working_set(self) -> int:
        """Transient bytes of the peak phase: attention scores, activations, the layer copy."""
        return self.attention + self.activations + self.copy

    @property
    def total(self) -> int:
        """Peak device bytes: weights + projections + overhead + KV held and working set at the peak."""
        return self.weights + self.projections + self.overhead + self.peak_kv + self.working_set


def combine(devices: Sequence[Breakdown]) -> Breakdown:
    """A split run's breakdown: every byte field summed over ``devices`` (kept in :attr:`Breakdown.devices`).

    The peak phase and the formula's terms are those of the device with the largest peak.
    """
    busiest = max(devices, key=lambda d: d.total)
    sums = {f.name: sum(getattr(d, f.name) for d in devices) for f in fields(Breakdown)
            if f.name not in ("peak_phase", "terms", "devices")}
    return Breakdown(**sums, peak_phase=busiest.peak_phase, terms=busiest.terms, devices=tuple(devices))

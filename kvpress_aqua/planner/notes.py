"""The caveats a plan states (:attr:`~kvpress_aqua.planner.search.Plan.notes`): what it leaves out or assumes.

:func:`plan_notes` writes them from the run (:class:`~kvpress_aqua.planner.memory.MemoryModel`),
the limits and the recommendation; :func:`kvpress_aqua.planner.search.plan` adds the model's own
notes and the prefill-chunk hint.
"""

from __future__ import annotations

from typing import Any

from ..util.sizes import format_bytes
from .fit import Limits
from .memory import MemoryModel
from .points import Candidate
from .retrieval import RETRIEVAL_KNOBS
from .summaries import SUMMARY_KNOBS

__all__ = ["plan_notes"]


def plan_notes(mm: MemoryModel, limits: Limits, best: Candidate | None, *, dtype_given: bool,
               host_budget: Any = None) -> list[str]:
    """The caveats of a plan of ``mm`` under ``limits`` whose recommendation is ``best`` (``None``: nothing fits).

    Parameters
    ----------
    mm : MemoryModel
        The run planned.
    limits : Limits
        What the plan fits.
    best : Candidate or None
        The recommendation.
    dtype_given : bool
        Whether the dtype was given (else the config's, or fp32 when it states none).
    host_budget : str, int or None
        The host budget as given (retrieval), named when it goes unused.

    Returns
    -------
    list of str

    """
    shape, notes = mm.shape, []
    if shape.max_position_embeddings and mm.context + mm.new_tokens > shape.max_position_embeddings:
        notes.append(f"context + new tokens = {mm.context + mm.new_tokens:,} exceeds the model's "
                     f"max_position_embeddings {shape.max_position_embeddings:,}")
    if not dtype_given and shape.dtype is None:
        notes.append("the config states no dtype; planned for fp32 (pass --dtype)")
    if best is not None and limits.device is None:
        busiest, gpu = best.memory.busiest, " on the most loaded GPU" if best.memory.devices else ""
        notes.append(f"device memory not checked: the run needs about {format_bytes(busiest.total)}{gpu} "
                     f"(weights {format_bytes(busiest.weights)}); --device-memory h100 (or a size) checks it")
    if mm.parallel is not None:
        notes.append(f"{mm.parallel.gpus} GPUs, {mm.parallel.rule}; --budget and --device-memory apply to every GPU")
    if mm.keeps_rate:
        notes.append(f"{mm.token_policy} keeps a rate, not a budget: {SUMMARY_KNOBS['sinks']} sinks, "
                     f"{SUMMARY_KNOBS['recent']} recent tokens and 1/2^halvings of every full "
                     f"{SUMMARY_KNOBS['block']}-token block of the middle, so its memory grows with the tokens seen "
                     f"(planned for {mm.seen:,}; decoding more holds more)")
    if mm.retrieves:
        notes += _retrieval_notes(mm, limits, best, host_budget)
    if any(e["type"] == "aqua" for e in (best.entries if best else ())):
        notes.append("AQUA needs a calibration artifact for this model (kvtool calibrate) before the cache is built")
    return notes


def _retrieval_notes(mm: MemoryModel, limits: Limits, best: Candidate | None, host_budget: Any) -> list[str]:
    """What a retrieval plan leaves out or assumes: growth past the planned tokens, the unchecked host."""
    notes = [f"retrieval keeps every token ({RETRIEVAL_KNOBS['sinks']} sinks and {RETRIEVAL_KNOBS['recent']} recent "
             f"held, top_k retrieved per decode step by a {RETRIEVAL_KNOBS['proxy']} proxy fit on each prompt), so its "
             f"tier and proxy keys grow with every token (planned for {mm.seen:,}; decoding more holds more)"]
    if mm.proxy_dtype == "int8":
        notes.append("int8 proxy keys: the quality heuristic does not model their rounding")
    if mm.offload is None:
        notes.append("the tier is on the device (--offload none): every token counts in the KV cache, with the proxy "
                     "keys and working sets on top, so retrieval never holds less than a plain cache (it reads fewer "
                     "rows per step, not fewer bytes)"
                     + (f"; --host-budget {host_budget} is not used" if host_budget is not None else ""))
    else:
        if limits.host is None and best is not None and best.top_k is not None:
            notes.append(f"host memory not checked: the tier needs at most {format_bytes(best.memory.host_peak)} "
                         "(--host-budget SIZE checks it)")
        notes.append("the host figures are the tier's tensors; on a GPU they are pinned memory, which PyTorch's "
                     "caching host allocator rounds up and keeps when the tier grows (one H200 run pinned 956 MB for "
                     "a 401 MB tier): leave the host that slack")
    return notes

"""Needle-in-a-haystack stress tests: the cell runner.

A *cell* is one (policy, protocol, task, context length, depth). For each cell a prompt of exactly
``length`` tokens is built (:mod:`kvpress_aqua.evaluation.needle.prompts`) from a haystack
(:mod:`kvpress_aqua.data.haystack`) and a task's needle (:mod:`kvpress_aqua.evaluation.needle.tasks`).
The model answers greedily through a :class:`~kvpress_aqua.core.cache.CompressedCache` built for
the policy (:func:`kvpress_aqua.evaluation.generation.greedy_generate`), and the answer is scored by
exact match of the expected values into a result row (:mod:`kvpress_aqua.evaluation.needle.results`).

Protocols (named in every result row):

- ``query-aware``: the whole prompt, question included, goes through the cache in one prefill,
  then decoding; compression can use the question (kvpress's "question in the prompt" setting).
- ``context-first``: the context is prefilled and compressed first; the question then comes as a
  new chunk that only sees what the cache kept (prefix reuse: one compressed context, many
  questions). The harder and more honest protocol.

See ``docs/needle.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...core.cache import CompressedCache
from ...data.haystack import Haystack
from ...presets.spec import PolicySpec
from ..generation import eos_ids, greedy_generate
from ..static_decode import compiled_step
from .prompts import PromptBuilder
from .tasks import Cell, cell_rng, make_task, score_answer

__all__ = ["RunConfig", "batches", "check_policies", "run_cells"]


@dataclass
class RunConfig:
    """What every cell of a run shares (recorded in each row).

    Attributes
    ----------
    model : str
        Model name recorded in the rows.
    haystack : Haystack
        Filler text.
    seed : int
        Seed of the needles.
    prefill_chunk : int or None
        Prefill chunk size; ``None`` feeds each prompt (or context) in one forward.
    batch_size : int
        Depths run together (same policy, protocol, task and length: equal prompt lengths, no padding).
    compile : bool
        Decode the answers through a static cache and the compiled step
        (:func:`~kvpress_aqua.evaluation.static_decode.compiled_step`) where the cache can be made static.

    """

    model: str
    haystack: Haystack
    seed: int = 0
    prefill_chunk: int | None = 512
    batch_size: int = 4
    compile: bool = False
    _builder: PromptBuilder | None = field(default=None, repr=False)
    _step: Callable[..., Any] | None = field(default=None, repr=False)


def run_cells(
    model: Any,
    tokenizer: Any,
    cells: Sequence[Cell],
    specs: dict[str, PolicySpec],
    config: RunConfig,
    on_row: Callable[[dict[str, Any]], None],
) -> None:
    """Run cells, batching depths that share policy, protocol, task and length.

    Parameters
    ----------
    model, tokenizer
        A causal LM and its tokenizer.
    cells : sequence of Cell
        Cells to run (already filtered for resume).
    specs : dict
        Parsed policy per ``cell.policy`` name; each row records the name and the spec's content
        key (``policy_key``), which is what a resume matches on.
    config : RunConfig
        Shared settings.
    on_row : callable
        Called with each finished row (a dict with
        :data:`~kvpress_aqua.evaluation.needle.results.RESULT_FIELDS`), as soon as its batch is done.

    Notes
    -----
    The full cache makes the two protocols the same computation (nothing is compressed), so a
    ``full`` policy is run once with the query-aware protocol and its rows are recorded under every
    protocol asked for, marked ``shared_with``.

    """
    if config._builder is None:
        config._builder = PromptBuilder(tokenizer, config.haystack)
    if config.compile and config._step is None:
        config._step = compiled_step()
    eos = eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    for (policy, run_protocol, task, length), by_depth in _groups(cells, specs).items():
        spec = specs[policy]
        depths = list(by_depth)
        for lo in range(0, len(depths), config.batch_size):
            chunk = depths[lo:lo + config.batch_size]
            instances = [make_task(task, cell_rng(config.seed, task, length, d)) for d in chunk]
            prompts = [config._builder.build(inst, length, d) for inst, d in zip(instances, chunk, strict=True)]
            ids = torch.stack([p.input_ids for p in prompts]).to(device)
            split = length if run_protocol == "query-aware" else prompts[0].context_tokens
            cache = CompressedCache(model, *spec.build(context=length), prefill_chunk=config.prefill_chunk)
            start = time.perf_counter()
            try:
                out = greedy_generate(model, cache, ids, instances[0].max_new_tokens, eos, prefill_tokens=split,
                                      step=config._step)
            finally:
                cache.detach()
            seconds = (time.perf_counter() - start) / len(chunk)
            stats = cache.retrieval_stats() or {}
            retrieval = {"host_kv_bytes": cache.nbytes("host") // len(chunk), "hit_rate": stats.get("hit_rate"),
                         "h2d_bytes_per_step": stats["bytes_per_step"] / len(chunk)} if stats else {}
            held, dense = out.kv_bytes, out.dense_kv_bytes
            for depth, prompt, tokens in zip(chunk, prompts, out.tokens, strict=True):
                answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
                for protocol in by_depth[depth]:
                    on_row({
                        "model": config.model, "haystack": config.haystack.name, "seed": config.seed,
                        "policy": policy, "policy_key": spec.key, "protocol": protocol, "task": task,
                        "length": length, "depth": depth,
                        "kv_bytes": held, "dense_kv_bytes": dense, "kv_fraction": round(held / dense, 4),
                        "expected": " ".join(prompt.task.expected), "answer": answer,
                        "score": score_answer(answer, prompt.task.expected), "needle_at": prompt.needle_at,
                        "prefill_chunk": config.prefill_chunk, "seconds": round(seconds, 2),
                        "shared_with": run_protocol if run_protocol != protocol else "",
                        "device": ids.device.type, **retrieval,
                    })


def batches(cells: Sequence[Cell], specs: dict[str, PolicySpec], batch_size: int) -> list[list[Cell]]:
    """The cells of each batch :func:`run_cells` runs, in its order.

    A batch is up to ``batch_size`` depths of one policy, protocol, task and length; a full cache's
    batch carries the cells of every protocol it answers (see :func:`run_cells`). Running any
    subset of whole batches, in this order, runs exactly these batches again.
    """
    out = []
    by_key = {c.key(): c for c in cells}
    for (policy, _, task, length), by_depth in _groups(cells, specs).items():
        depths = list(by_depth)
        for lo in range(0, len(depths), batch_size):
            out.append([by_key[(policy, protocol, task, length, round(d, 3))]
                        for d in depths[lo:lo + batch_size] for protocol in by_depth[d]])
    return out


def check_policies(model: Any, specs: dict[str, PolicySpec], context: int) -> None:
    """Build every policy once on ``model`` so that a missing AQUA artifact or bad knob fails before any cell."""
    for spec in specs.values():
        CompressedCache(model, *spec.build(context=context)).detach()


def _groups(
    cells: Sequence[Cell], specs: dict[str, PolicySpec]
) -> dict[tuple[str, str, str, int], dict[float, list[str]]]:
    """Cells by (policy, protocol actually run, task, length): depth -> protocols recorded from that run."""
    groups: dict[tuple[str, str, str, int], dict[float, list[str]]] = {}
    for cell in cells:
        run_protocol = "query-aware" if specs[cell.policy].is_full else cell.protocol
        key = (cell.policy, run_protocol, cell.task, cell.length)
        groups.setdefault(key, {}).setdefault(cell.depth, []).append(cell.protocol)
    return groups

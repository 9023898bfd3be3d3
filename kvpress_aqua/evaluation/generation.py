"""Greedy generation through a compressed cache: the one decode loop of the needle harness and ``kvtool generate``.

:func:`greedy_generate` prefills a batch of equal-length prompts through a
:class:`~kvpress_aqua.core.cache.CompressedCache` (optionally only a first part of each, the rest
following as one new chunk that sees only what the cache kept), then decodes token by token,
taking the most likely token each step, until every row has produced an end-of-sequence token or
the token limit is reached. It measures the bytes the cache holds after the first decode step,
when a compressing cache has reached its steady state. Given a decode ``step`` (such as
:func:`kvpress_aqua.evaluation.static_decode.compiled_step`'s), a cache that can be made static
decodes through it instead: fixed buffers, one compiled graph per step (CUDA graphs on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch

from ..core.cache import CompressedCache
from ..util.compat import cache_kwargs

__all__ = ["Generation", "eos_ids", "greedy_generate"]


@dataclass(frozen=True)
class Generation:
    """The outcome of :func:`greedy_generate`.

    Attributes
    ----------
    tokens : torch.Tensor
        ``(batch, new)`` generated token ids; after a row's end-of-sequence token, the rest of the
        row repeats the smallest end-of-sequence id (``new`` is at most ``max_new_tokens``).
    kv_bytes : int
        Bytes one sequence's cache held after the first decode step (matrices shared by the batch,
        such as AQUA's projections, counted once).
    dense_kv_bytes : int
        Bytes a ``DynamicCache`` would hold per sequence at the same point.
    static : bool
        Whether the decode steps ran through a static cache and the given step.

    """

    tokens: torch.Tensor
    kv_bytes: int
    dense_kv_bytes: int
    static: bool = False


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The end-of-sequence ids of ``model``'s generation config and of ``tokenizer``."""
    ids = model.generation_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


def _held_per_sequence(cache: CompressedCache, batch: int) -> tuple[int, int]:
    """Bytes one sequence's cache holds and what a DynamicCache would hold (shared AQUA matrices counted once)."""
    report = cache.memory_report()
    policy = report.policy_bytes
    return (report.total - policy) // batch + policy, report.dense // batch


def greedy_generate(
    model: Any,
    cache: CompressedCache,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos: Collection[int],
    prefill_tokens: int | None = None,
    step: Callable[..., torch.Tensor] | None = None,
) -> Generation:
    """Greedy continuations of a batch of equal-length prompts, decoded through ``cache``.

    The cache evicts lazily (at the start of the next update), so right after the prompt it still
    holds the last chunk on top of its budget; the first decode step brings it to its steady state,
    which is when the bytes are measured. That step is always run, even when every row ends at its
    first token.

    Parameters
    ----------
    model : PreTrainedModel
        The causal LM ``cache`` was built for.
    cache : CompressedCache
        A fresh cache; prompts go through :meth:`~kvpress_aqua.core.cache.CompressedCache.prefill`
        (in its ``prefill_chunk`` chunks).
    input_ids : torch.Tensor
        ``(batch, prompt)`` token ids on the model's device, no padding.
    max_new_tokens : int
        Tokens generated per row at most (at least 1).
    eos : collection of int
        End-of-sequence ids (:func:`eos_ids`); a row stops at the first it produces, and generation
        stops once every row has. Empty: always ``max_new_tokens`` tokens.
    prefill_tokens : int, optional
        Prompt tokens prefilled (and compressed) first; the remaining ones are then fed as one chunk,
        which sees only what the cache kept. Default: the whole prompt.
    step : callable, optional
        A decode step with :func:`~kvpress_aqua.evaluation.static_decode.decode_step`'s signature (its
        compiled form, say): the cache is made static after the prompt and decodes through it, if it
        can be (:attr:`~kvpress_aqua.core.cache.CompressedCache.can_make_static`); otherwise, and by
        default, the growing cache's ``model(token, cache=...)``.

    Returns
    -------
    Generation

    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: give at least 1")
    split = input_ids.shape[1] if prefill_tokens is None else prefill_tokens
    batch = input_ids.shape[0]
    past = cache_kwargs(model, cache)  # cache= on transformers >= 5.24, past_key_values= before
    with torch.inference_mode():
        logits = cache.prefill(input_ids[:, :split])
        if split < input_ids.shape[1]:
            logits = model(input_ids[:, split:], **past, use_cache=True, logits_to_keep=1).logits[:, -1]
        static = step is not None and cache.can_make_static
        if static:  # every forward below is one decode step: at most max(1, max_new_tokens - 1) of them
            positions = cache.real_tokens_seen()[:, None].to(input_ids.device)
            cache.make_static(max(1, max_new_tokens - 1))
            mask = torch.ones(batch, 1, 1, 1, dtype=torch.bool, device=input_ids.device)
        eos_t = torch.tensor(sorted(eos), dtype=torch.long, device=input_ids.device)
        stop = int(eos_t[0]) if eos_t.numel() else 0
        done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        tokens, held = [], None
        for i in range(max_new_tokens):
            token = logits.argmax(-1).masked_fill(done, stop)
            tokens.append(token)
            done |= torch.isin(token, eos_t)
            if held is not None and (bool(done.all()) or i == max_new_tokens - 1):
                break
            if static:
                if hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                    torch.compiler.cudagraph_mark_step_begin()
                logits = step(model, cache, token[:, None], positions, mask).clone()
                positions = positions + 1
            else:
                logits = model(token[:, None], **past, use_cache=True).logits[:, -1]
            if held is None:
                held = _held_per_sequence(cache, batch)
    return Generation(torch.stack(tokens, dim=1), *held, static=static)

"""Greedy generation with a static compressed cache and a compiled decode step (CUDA graphs on a GPU).

The prompt is prefilled eagerly (in chunks, evicting between them); then the cache is made static
(:meth:`~kvpress_aqua.core.cache.CompressedCache.make_static`) and every decode step runs one
compiled function: ``model(token, position_ids=..., attention_mask=<4-D>, cache=...)``. The 4-D mask
and the explicit positions keep ``transformers`` from building masks or reading the cache's length,
so the step is the same graph from the first token to the last; ``mode="reduce-overhead"`` replays
it as a CUDA graph. This is the gpt-fast recipe: static buffers written in place, the step compiled
whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..core.cache import CompressedCache
from ..util.compat import cache_kwargs

__all__ = ["compiled_step", "decode_step", "generate_static"]


def decode_step(model: Any, cache: CompressedCache, token: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
    """One decode step: logits ``(batch, vocab)`` of the next token after ``token`` ``(batch, 1)``."""
    out = model(input_ids=token, position_ids=positions, attention_mask=mask, use_cache=True, logits_to_keep=1,
                **cache_kwargs(model, cache))
    return out.logits[:, -1]


def compiled_step(mode: str | None = "reduce-overhead", backend: str = "inductor",
                  fullgraph: bool = True) -> Callable[..., torch.Tensor]:
    """:func:`decode_step` under ``torch.compile`` (whole graph by default, static shapes)."""
    return torch.compile(decode_step, mode=mode, backend=backend, fullgraph=fullgraph, dynamic=False)


def generate_static(
    model: Any,
    cache: CompressedCache,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    step: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Greedy tokens ``(batch, max_new_tokens)`` after a prompt, decoded through a static cache.

    Parameters
    ----------
    model : PreTrainedModel
        A causal LM.
    cache : CompressedCache
        A fresh cache with at least one policy (its ``prefill_chunk`` chunks the prompt).
    input_ids : torch.Tensor
        ``(batch, prompt)`` token ids, left-padded for batches.
    max_new_tokens : int
        Tokens to generate (no early stop: every row decodes the same number of steps).
    attention_mask : torch.Tensor, optional
        ``(batch, prompt)``, 0 for left padding.
    step : callable, optional
        The decode step; default :func:`decode_step` uncompiled. Pass :func:`compiled_step`'s
        result (built once, reused across calls of the same shapes) to compile it.

    Returns
    -------
    torch.Tensor
        The generated token ids.

    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: give at least one token")
    step = step or decode_step
    with torch.inference_mode():
        logits = cache.prefill(input_ids, attention_mask)
        positions = cache.real_tokens_seen()[:, None].to(input_ids.device)
        cache.make_static(max_new_tokens - 1)
        mask = torch.ones(input_ids.shape[0], 1, 1, 1, dtype=torch.bool, device=input_ids.device)
        token = logits.argmax(-1, keepdim=True)
        tokens = [token]
        for _ in range(max_new_tokens - 1):
            if hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                torch.compiler.cudagraph_mark_step_begin()
            token = step(model, cache, token, positions, mask).argmax(-1, keepdim=True)
            tokens.append(token)
            positions = positions + 1
    return torch.cat(tokens, dim=1)

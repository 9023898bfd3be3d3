"""Perplexity with the compressed cache in the loop.

The text is fed through a :class:`~kvpress_aqua.CompressedCache` in chunks of ``chunk`` tokens
(``model(chunk, cache=cache)``; ``past_key_values=`` before transformers 5.24, see
:func:`kvpress_aqua.util.compat.cache_kwarg`), and each token's negative log-likelihood comes from the
logits of that forward: every prediction reads the past *as the cache holds it* (evicted tokens
gone, keys pruned under AQUA). A single full forward would never read the cache, so it would
measure nothing. Inside a chunk the tokens see each other at full precision (as in a prefill), so
``chunk=1`` is pure token-by-token decoding and larger chunks are faster and slightly kinder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from ..core.cache import CompressedCache
from ..policies.base import ChannelPolicy, TokenPolicy
from ..util.compat import cache_kwargs

__all__ = ["PerplexityResult", "perplexity"]


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one text under one policy stack.

    Attributes
    ----------
    tokens : int
        Tokens scored (the text's length minus one: the first token has no prediction).
    nll : float
        Mean negative log-likelihood per scored token (nats).
    kv_bytes : int
        Bytes the cache held after the last chunk (its budget plus that chunk's tokens).
    dense_kv_bytes : int
        Bytes a ``DynamicCache`` would hold at the same point.
    seconds : float
        Wall time of the pass.

    """

    tokens: int
    nll: float
    kv_bytes: int
    dense_kv_bytes: int
    seconds: float

    @property
    def ppl(self) -> float:
        """``exp(nll)``."""
        return float(torch.tensor(self.nll).exp())


def perplexity(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    policies: Sequence[TokenPolicy | ChannelPolicy] = (),
    chunk: int = 32,
    on_chunk: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``input_ids`` with every prediction made through a compressed cache.

    Parameters
    ----------
    model : PreTrainedModel
        A causal LM.
    input_ids : torch.Tensor
        ``(1, n)`` or ``(n,)`` token ids, ``n >= 2``.
    policies : sequence of policies
        The stack for :class:`~kvpress_aqua.CompressedCache`; empty for the dense reference.
    chunk : int
        Tokens per forward (1 = token-by-token decoding).
    on_chunk : callable, optional
        Called with the number of tokens scored after each forward (progress bars).

    Returns
    -------
    PerplexityResult

    """
    ids = input_ids.reshape(1, -1).to(next(model.parameters()).device)
    n = ids.shape[1]
    if n < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n}")
    if chunk <= 0:
        raise ValueError(f"chunk={chunk}: give a positive number of tokens per forward")
    cache = CompressedCache(model, *policies)
    past = cache_kwargs(model, cache)
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for lo in range(0, n - 1, chunk):
                hi = min(lo + chunk, n - 1)
                logits = model(ids[:, lo:hi], **past, use_cache=True).logits[0]
                total += F.cross_entropy(logits.float(), ids[0, lo + 1:hi + 1], reduction="sum").double()
                if on_chunk is not None:
                    on_chunk(hi - lo)
        held, dense = cache.nbytes(), cache.dense_nbytes()
    finally:
        cache.detach()
    return PerplexityResult(n - 1, float(total) / (n - 1), held, dense, time.perf_counter() - start)

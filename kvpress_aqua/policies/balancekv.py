"""BalanceKV: keep a balanced half of each block, twice or more, by a self-balancing walk."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ops.walk import balancing_signs
from .blocks import BlockSummary, Draws


@dataclass
class BalanceKV(BlockSummary):
    """Reduce each block of the middle by ``halvings`` balanced halvings; the kept tokens stand for the rest.

    Based on "BalanceKV: KV Cache Compression through Discrepancy Theory" (Han et al., 2025,
    https://arxiv.org/abs/2502.07861). One halving splits a block's tokens into two halves whose
    sums of ``exp(<q, k> / sqrt(d)) [v, c]`` agree for every query ``q`` as nearly as a
    self-balancing walk (Alweiss, Liu and Sawhney, 2021) makes them, and keeps one half with twice
    the weight: the attention over the kept tokens then estimates both the softmax numerator and its
    normaliser over the whole block. The walk only needs the kernel between tokens,
    ``G_ij = exp(<k_i, k_j> / sqrt(d)) (<v_i, v_j> + c)``, on keys centred in the block (which
    scales every query's terms alike and so changes no balance). By default the values are centred
    in the block too (``centre_values``) and ``c`` is 0: the walk then balances
    ``sum exp(<q, k>) (v - vbar)``, which is ``dN - vbar dD``, the first-order change of the output
    ``N / D`` when the block's values average ``vbar`` (a ratio estimator's linearisation), rather
    than the numerator ``N`` and the normaliser ``D`` each on its own.

    Parameters
    ----------
    halvings, sinks, recent, block, seed
        As in :class:`~kvpress_aqua.policies.blocks.BlockSummary` (defaults: the paper's 32 sinks,
        32 recent tokens, blocks of 128, two halvings: a kept token stands for 4).
    gamma : float, default inf
        The walk's greed: the sign of pair ``p`` is ``+1`` with probability
        ``clip(1/2 - gamma y_p / ||u_p||^2, 0, 1)``, ``y_p`` the kernel of its difference ``u_p``
        against the signed sum so far (1/2 when that is 0). ``inf`` (the default) always takes the
        sign that shrinks the sum, the greedy limit; the paper's analysis uses a nearly fair coin
        (``1/2 - y / (2 c R^2)`` with a large ``c``), its public code ``1/2 - 4 y`` on the
        unnormalised kernel, nearly greedy. On SmolLM2 the greedy walk gave the lowest attention
        error of the forms tried (``docs/balancekv.md``).
    centre_values : bool, default True
        Centre the values in the block for the kernel (the buckets keep the raw ``||v||``). On
        SmolLM2 it lowered the attention error at 1/8 and 1/16 (``docs/balancekv.md``); ``False``
        is the paper's kernel.
    value_offset : float or None, default None
        ``c``, weighing the normaliser's balance against the values'; ``None``: 0 with centred
        values, else the block's mean ``||v||^2`` (the paper's code adds 0.025).
    temperature : float, default 1
        ``t`` in the kernel ``exp(t <k_i, k_j> / sqrt(d))`` (the paper's code's ``temp``). Below 1
        the kernel weighs the keys' first moments more than their self-similarity, as a query whose
        ``<q, k>`` is much smaller than ``||k||^2`` sees them.

    Notes
    -----
    Shapes: keys ``(batch, kv_heads, blocks, block, key_dim)`` as stored, values
    ``(..., head_dim)``; every KV head walks its own blocks, all of them at once (``block / 2``
    sequential steps for the first halving). Unlike the paper, which signs tokens one by one and
    keeps the lighter signed half, the walk signs *pairs* of tokens (neighbours after sorting the
    block by the power of two of ``||v||``, the paper's buckets, then by position) and keeps one
    token of each pair: exactly half the block, the same count in every row, as a rectangular cache
    needs. Known limits: summaries are not merged again (the memory grows at the rate
    ``2**-halvings``, not to a fixed budget); under AQUA the kernel uses the stored key channels;
    the walk is ``O(block^2)`` memory and ``block / 2`` small steps per halving, so prefill costs
    more than a ranking policy's.

    """

    gamma: float = math.inf
    centre_values: bool = True
    value_offset: float | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gamma <= 0:
            raise ValueError(f"BalanceKV(gamma={self.gamma}): must be > 0")
        if self.value_offset is not None and self.value_offset < 0:
            raise ValueError(f"BalanceKV(value_offset={self.value_offset}): must be >= 0 (or None)")
        if not self.temperature > 0:
            raise ValueError(f"BalanceKV(temperature={self.temperature}): must be > 0")

    def choose(self, keys: torch.Tensor, values: torch.Tensor, draws: Draws) -> torch.Tensor:
        """Positions each block keeps after ``halvings`` balanced halvings, ascending."""
        keys, values = keys.float(), values.float()
        position = torch.arange(self.block, device=keys.device).expand(*keys.shape[:-1])
        for _ in range(self.halvings):
            at = position[..., None]
            kept = self.halve(keys.gather(-2, at.expand(*at.shape[:-1], keys.shape[-1])),
                              values.gather(-2, at.expand(*at.shape[:-1], values.shape[-1])), draws)
            position = position.gather(-1, kept)
        return position.sort(dim=-1).values

    def halve(self, keys: torch.Tensor, values: torch.Tensor, draws: Draws) -> torch.Tensor:
        """One balanced halving.

        Parameters
        ----------
        keys, values : torch.Tensor
            float32 ``(..., m, dim)``: ``m`` tokens (even) of each block.
        draws : Draws
            The walk's random source.

        Returns
        -------
        torch.Tensor
            int64 ``(..., m / 2)``: the kept tokens' places in the ``m``, one of each pair.

        """
        m = keys.shape[-2]
        centred = keys - keys.mean(-2, keepdim=True)
        logits = centred @ centred.transpose(-1, -2) * (self.temperature / math.sqrt(keys.shape[-1]))
        # the largest logit is on the diagonal; subtracting it scales the kernel, not the walk's choices
        logits = logits - logits.diagonal(dim1=-2, dim2=-1).amax(-1)[..., None, None]
        kernel_values = values - values.mean(-2, keepdim=True) if self.centre_values else values
        if self.value_offset is not None:
            offset = self.value_offset
        else:
            offset = 0.0 if self.centre_values else values.pow(2).sum(-1).mean(-1)[..., None, None]
        kernel = logits.exp() * (kernel_values @ kernel_values.transpose(-1, -2) + offset)
        bucket = torch.floor(torch.log2(values.norm(dim=-1).clamp_min(1e-30)))
        order = torch.argsort(bucket * m + torch.arange(m, device=keys.device), dim=-1)
        first, second = order[..., 0::2], order[..., 1::2]

        def pick(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            sub = kernel.gather(-2, rows[..., None].expand(*rows.shape, m))
            return sub.gather(-1, cols[..., None, :].expand(*cols.shape[:-1], rows.shape[-1], cols.shape[-1]))

        # inner products of the pairs' differences u_p = phi(first_p) - phi(second_p), exactly symmetric
        gram = pick(first, first) - pick(first, second) - pick(second, first) + pick(second, second)
        gram = (gram + gram.transpose(-1, -2)) / 2
        signs = balancing_signs(gram, draws.rand(gram.shape[:-1], gram.device), self.gamma)
        return torch.where(signs > 0, first, second)

"""Uniform sampling: keep a random subset of each block of the middle, reweighted."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import BlockSummary, Draws


@dataclass
class Uniform(BlockSummary):
    """Keep ``block / 2**halvings`` uniformly drawn tokens of each block of the middle, each standing for the rest.

    The simple baseline of "BalanceKV: KV Cache Compression through Discrepancy Theory" (Han et
    al., 2025, https://arxiv.org/abs/2502.07861), there the strongest of the simple ones: the same
    blocks, rate and reweighting as :class:`~kvpress_aqua.policies.BalanceKV`, the kept tokens drawn
    without replacement instead of balanced, so that any gain of BalanceKV is the walk's.

    Parameters
    ----------
    halvings, sinks, recent, block, seed
        As in :class:`~kvpress_aqua.policies.blocks.BlockSummary`.

    Notes
    -----
    Shapes as in :class:`~kvpress_aqua.policies.blocks.BlockSummary`; each KV head draws its own
    tokens. Known limits: those of block summaries (a rate, not a budget; no merging).

    """

    def choose(self, keys: torch.Tensor, values: torch.Tensor, draws: Draws) -> torch.Tensor:
        """A uniform draw without replacement per block, ascending."""
        return draws.rand(keys.shape[:-1], keys.device).topk(self.kept_per_block, dim=-1).indices.sort(dim=-1).values

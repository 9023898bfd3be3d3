"""The balancing walk: the Triton kernel against its PyTorch reference, and what the walk achieves."""

import math

import pytest
import torch

from kvpress_aqua.ops.triton_walk import triton_balancing_signs
from kvpress_aqua.ops.walk import balancing_signs_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _walk_inputs(seed, rows=6, pairs=64, dim=8):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(rows, pairs, dim, generator=gen) * torch.rand(rows, pairs, 1, generator=gen)
    gram = u @ u.transpose(-1, -2)
    gram = (gram + gram.transpose(-1, -2)) / 2
    return u, gram.to(DEVICE), torch.rand(rows, pairs, generator=gen).to(DEVICE)


@pytest.mark.parametrize("gamma", [math.inf, 4.0, 0.5])
@pytest.mark.parametrize("pairs", [64, 33, 1])
def test_the_kernel_equals_the_reference(gamma, pairs):
    _, gram, draws = _walk_inputs(0, pairs=pairs)
    want = balancing_signs_reference(gram, draws, gamma)
    got = triton_balancing_signs(gram, draws, gamma)
    assert torch.equal(got, want)
    assert set(got.unique().tolist()) <= {-1.0, 1.0}


def test_leading_dimensions_are_kept():
    _, gram, draws = _walk_inputs(1, rows=12, pairs=16)
    got = triton_balancing_signs(gram.view(2, 3, 2, 16, 16), draws.view(2, 3, 2, 16), math.inf)
    assert got.shape == (2, 3, 2, 16)
    assert torch.equal(got.view(12, 16), balancing_signs_reference(gram, draws, math.inf))


def test_the_greedy_walk_keeps_the_signed_sum_small():
    u, gram, draws = _walk_inputs(2, rows=50)
    signed = (balancing_signs_reference(gram, draws, math.inf).cpu()[..., None] * u).sum(1).norm(dim=-1)
    coins = torch.where(draws.cpu() < 0.5, 1.0, -1.0)
    random = (coins[..., None] * u).sum(1).norm(dim=-1)
    assert signed.mean() < 0.3 * random.mean()

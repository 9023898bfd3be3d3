"""The self-balancing walk in Triton: one program walks one row's ``P`` vectors, its Gram matrix read row by row.

Computes what :func:`kvpress_aqua.ops.walk.balancing_signs_reference` computes, without its ``P``
launches of small PyTorch operations per walk: the signed-sum projections ``y`` (``P`` floats) stay
in registers and each step reads one row of the (symmetric) Gram matrix. On CUDA; under
``TRITON_INTERPRET=1`` on CPU tensors (the tests).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["triton_balancing_signs"]


@triton.jit
def _walk_kernel(G, DRAWS, SIGNS, pairs, gamma, P: tl.constexpr, GREEDY: tl.constexpr):
    row = tl.program_id(0)
    idx = tl.arange(0, P)
    ok = idx < pairs
    base = G + row.to(tl.int64) * pairs * pairs
    norm = tl.maximum(tl.load(base + idx * pairs + idx, mask=ok, other=1.0), 1e-30)
    draws = tl.load(DRAWS + row.to(tl.int64) * pairs + idx, mask=ok, other=0.0)
    walk = tl.zeros([P], tl.float32)
    signs = tl.zeros([P], tl.float32)
    for p in range(0, pairs):
        at = idx == p
        y = tl.sum(tl.where(at, walk, 0.0), 0)
        if GREEDY:
            plus = tl.where(y > 0, 0.0, tl.where(y < 0, 1.0, 0.5))
        else:
            n = tl.sum(tl.where(at, norm, 0.0), 0)
            plus = tl.where(y == 0, 0.5, tl.minimum(tl.maximum(0.5 - gamma * y / n, 0.0), 1.0))
        s = tl.where(tl.sum(tl.where(at, draws, 0.0), 0) < plus, 1.0, -1.0)
        signs = tl.where(at, s, signs)
        walk += s * tl.load(base + p * pairs + idx, mask=ok, other=0.0)  # row p: column p of a symmetric matrix
    tl.store(SIGNS + row.to(tl.int64) * pairs + idx, signs, mask=ok)


def triton_balancing_signs(gram: torch.Tensor, draws: torch.Tensor, gamma: float) -> torch.Tensor:
    """:func:`~kvpress_aqua.ops.walk.balancing_signs_reference` in one launch; ``gram`` must be symmetric."""
    pairs = gram.shape[-1]
    rows = draws.numel() // max(pairs, 1)
    signs = torch.empty(draws.shape, dtype=torch.float32, device=draws.device)
    if rows == 0 or pairs == 0:
        return signs
    g = gram.reshape(rows, pairs, pairs).float().contiguous()
    d = draws.reshape(rows, pairs).float().contiguous()
    greedy = math.isinf(gamma)
    _walk_kernel[(rows,)](g, d, signs, pairs, 0.0 if greedy else float(gamma),
                          P=triton.next_power_of_2(pairs), GREEDY=greedy)
    return signs

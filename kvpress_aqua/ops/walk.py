"""The self-balancing walk of BalanceKV: signs for a sequence of vectors known only by their Gram matrix.

Tensors in, tensors out. :func:`balancing_signs_reference` is the PyTorch reference (one small step
per vector); :func:`balancing_signs` runs the fused Triton kernel (:mod:`kvpress_aqua.ops.triton_walk`,
the whole walk of one row in one program) on CUDA where Triton is installed, else the reference.
``tests/test_walk.py`` holds the two equal.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["balancing_signs", "balancing_signs_reference"]


def balancing_signs_reference(gram: torch.Tensor, draws: torch.Tensor, gamma: float) -> torch.Tensor:
    """Signs ``s_p`` that keep ``sum_p s_p u_p`` small, choosing them one after another.

    Parameters
    ----------
    gram : torch.Tensor
        float32 ``(..., P, P)``, symmetric: ``<u_p, u_q>``.
    draws : torch.Tensor
        float32 ``(..., P)`` uniform in ``[0, 1)``: the walk's coins.
    gamma : float
        Greed: ``s_p = +1`` with probability ``clip(1/2 - gamma y_p / <u_p, u_p>, 0, 1)``, ``y_p``
        ``<sum_{q<p} s_q u_q, u_p>`` (1/2 when ``y_p`` is 0); ``inf`` takes the shrinking sign.

    Returns
    -------
    torch.Tensor
        float32 ``(..., P)`` of ``+1`` and ``-1``.

    """
    norm = gram.diagonal(dim1=-2, dim2=-1).clamp_min(1e-30)
    walk = torch.zeros_like(draws)  # y_p for every p, as the signed sum grows
    sign = torch.empty_like(draws)
    for p in range(gram.shape[-1]):
        y = walk[..., p]
        plus = torch.where(y == 0, 0.5, (0.5 - gamma * y / norm[..., p]).clamp(0.0, 1.0))
        sign[..., p] = torch.where(draws[..., p] < plus, 1.0, -1.0)
        walk += sign[..., p, None] * gram[..., p]
    return sign


@functools.cache
def _fused() -> Callable[..., Any] | None:
    """The Triton walk, or ``None`` where Triton is not installed (imported on the first CUDA call only)."""
    try:
        from .triton_walk import triton_balancing_signs
    except ImportError:
        return None
    return triton_balancing_signs


def balancing_signs(gram: torch.Tensor, draws: torch.Tensor, gamma: float) -> torch.Tensor:
    """:func:`balancing_signs_reference`, by the fused kernel on CUDA (one program per walk)."""
    fused = _fused() if gram.is_cuda else None
    return fused(gram, draws, gamma) if fused is not None else balancing_signs_reference(gram, draws, gamma)

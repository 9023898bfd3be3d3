"""Attention mass per key in Triton: what each held slot received, for the policies that rank by it (H2O, TOVA).

Two ways, one per kind of call of :mod:`kvpress_aqua.ops.triton_attention`:

- :func:`segment_mass` (prefill chunks): a second pass over one key segment with the rows' final
  log-sum-exp, so the working set stays ``O(BLOCK_M x BLOCK_N)``;
- :func:`decode_mass` (decode steps): one small pass over the raw scores the attention pass
  wrote (``G x S`` floats per KV head), which can also fold the mass into the layer's score
  buffer in place (``score * decay + mass``, the new token's mass at its slot), so that a static
  decode step runs one kernel where it ran four.

On CUDA; under ``TRITON_INTERPRET=1`` on CPU tensors, as the attention kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["decode_mass", "pow2", "precision", "program_tile", "segment_mass", "strides3"]


def pow2(x: int) -> int:
    """The block width for ``x`` channels: a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(x))


def strides3(x: torch.Tensor) -> tuple[int, int, int]:
    """The first three strides (batch, head, row) a kernel takes with a tensor."""
    return x.stride(0), x.stride(1), x.stride(2)


def precision(x: torch.Tensor) -> str:
    """``ieee`` for float32 operands (exact float32 products, as PyTorch's matmul), else the default."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


@triton.jit
def program_tile(kv_heads, BLOCK: tl.constexpr):
    """The program's sequence, KV head (grid axis 1: ``batch * kv_heads``) and tile of ``BLOCK`` indices (axis 0)."""
    bh = tl.program_id(1)
    return bh // kv_heads, bh % kv_heads, tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _mass_kernel(Q, q_b, q_h, q_r, K, k_b, k_h, k_n, VIS, vis_b, vis_h, IDX, idx_b, idx_h, BIAS, bias_b, bias_h,
                 LSE, l_b, l_h,
                 MASS, m_b, m_h, kv_heads, rows_total, n, keys, first_index, window, scale_log2, w, row_from,
                 W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Attention weight each key of a segment received, summed over the query rows of its KV head from ``row_from``."""
    b, h, cols = program_tile(kv_heads, BLOCK_N)
    col_ok = cols < keys
    ch = tl.arange(0, W)
    k = tl.load(K + b * k_b + h * k_h + cols[:, None] * k_n + ch[None, :],
                mask=col_ok[:, None] & (ch[None, :] < w), other=0.0)
    vis = tl.load(VIS + b * vis_b + h * vis_h + cols, mask=col_ok, other=0) != 0
    if HAS_WINDOW:
        idx = tl.load(IDX + b * idx_b + h * idx_h + cols, mask=col_ok, other=0)
    if HAS_BIAS:
        bias = tl.load(BIAS + b * bias_b + h * bias_h + cols, mask=col_ok, other=0.0) * 1.4426950408889634
    total = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, rows_total, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < rows_total
        t = rows % n
        q = tl.load(Q + b * q_b + h * q_h + rows[:, None] * q_r + ch[None, :],
                    mask=row_ok[:, None] & (ch[None, :] < w), other=0.0)
        lse = tl.load(LSE + b * l_b + h * l_h + rows, mask=row_ok, other=float("-inf"))
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        if HAS_BIAS:
            s += bias[None, :]
        mask = (row_ok & (t >= row_from))[:, None] & col_ok[None, :] & vis[None, :] & (lse[:, None] != float("-inf"))
        if HAS_WINDOW:
            mask = mask & (idx[None, :] > (first_index + t)[:, None] - window)
        if CAUSAL:
            mask = mask & (cols[None, :] <= t[:, None])
        p = tl.where(mask, tl.exp2(s - tl.where(mask, lse[:, None], 0.0)), 0.0)
        total += tl.sum(p, 0)
    tl.store(MASS + b * m_b + h * m_h + cols, total, mask=col_ok)


def segment_mass(q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, lse: torch.Tensor, n: int,
                 scale_log2: float, index: torch.Tensor | None = None, window: int | None = None,
                 first_index: int = 0, causal: bool = False, bias: torch.Tensor | None = None,
                 row_from: int = 0) -> torch.Tensor:
    """Mass per key ``(B, H_kv, keys)`` of one segment from the final log-sum-exp (log2) of rows ``t >= row_from``.

    ``q`` is ``(B, H_kv, G * n, w)`` (rows: group member, then chunk position), ``keys``
    ``(B, H_kv, keys, w)``, ``visible`` the keys' ``(B, H_kv, keys)`` visibility, ``lse``
    ``(B, H_kv, G * n)``; ``index``/``window`` mask keys outside a query's window, ``causal``
    keys after it, ``bias`` adds a per-key log-weight (natural log).
    """
    batch, kv_heads, rows, width = q.shape
    count = keys.shape[-2]
    mass = torch.empty(batch, kv_heads, count, dtype=torch.float32, device=q.device)  # every key is written
    if count == 0:
        return mass
    block_n = 32
    idx = index if index is not None else visible
    weight = bias if bias is not None else lse
    _mass_kernel[(triton.cdiv(count, block_n), batch * kv_heads)](
        q, *strides3(q), keys, *strides3(keys), visible, visible.stride(0), visible.stride(1),
        idx, idx.stride(0), idx.stride(1), weight, weight.stride(0), weight.stride(1), lse, lse.stride(0),
        lse.stride(1), mass, mass.stride(0), mass.stride(1),
        kv_heads, rows, n, count, first_index, window or 0, scale_log2, width, row_from,
        W=pow2(width), BLOCK_M=16, BLOCK_N=block_n, HAS_WINDOW=window is not None, CAUSAL=causal,
        PRECISION=precision(q), HAS_BIAS=bias is not None,
    )
    return mass


@triton.jit
def _decode_mass_kernel(SC, sc_b, sc_h, sc_r, LSE, l_b, l_h, PAST, p_b, p_h, NEW, n_b, n_h,
                        SCORE, s_b, s_h, SLOT, ns_b, ns_h, decay, kv_heads, rows_total, S, total, held,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, FOLD: tl.constexpr):
    """Mass per key from a decode pass's raw scores (log2 units): past keys ``[0, S)``, the new key after them.

    With ``FOLD`` the held slots' scores become ``score * decay + mass``, plus the new key's mass
    at its slot ``SLOT``: every program sums the new key's column itself, so no program waits
    for another.
    """
    b, h, cols = program_tile(kv_heads, BLOCK_N)
    col_ok = cols < total
    acc = tl.zeros([BLOCK_N], tl.float32)
    new_mass = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, rows_total, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        row_ok = rows < rows_total
        lse = tl.load(LSE + b * l_b + h * l_h + rows, mask=row_ok, other=float("-inf"))
        seen = lse != float("-inf")
        s = tl.load(SC + b * sc_b + h * sc_h + rows[:, None] * sc_r + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=float("-inf"))
        ok = (s != float("-inf")) & seen[:, None]
        acc += tl.sum(tl.where(ok, tl.exp2(s - tl.where(ok, lse[:, None], 0.0)), 0.0), 0)
        if FOLD:
            s_new = tl.load(SC + b * sc_b + h * sc_h + rows * sc_r + S, mask=row_ok, other=float("-inf"))
            ok_new = (s_new != float("-inf")) & seen
            new_mass += tl.where(ok_new, tl.exp2(s_new - tl.where(ok_new, lse, 0.0)), 0.0)
    tl.store(PAST + b * p_b + h * p_h + cols, acc, mask=cols < S)
    tl.store(NEW + b * n_b + h * n_h + cols - S, acc, mask=col_ok & (cols >= S))
    if FOLD:
        mine = cols < held
        slot = tl.load(SLOT + b * ns_b + h * ns_h)
        old = tl.load(SCORE + b * s_b + h * s_h + cols, mask=mine, other=0.0)
        mass = tl.where(cols < S, acc, 0.0) + tl.where(cols == slot, tl.sum(new_mass, 0), 0.0)
        tl.store(SCORE + b * s_b + h * s_h + cols, old * decay + mass, mask=mine)


def decode_mass(scores: torch.Tensor, lse: torch.Tensor, slots: int, score_out: torch.Tensor | None = None,
                new_slots: torch.Tensor | None = None, score_decay: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mass_past (B, H_kv, slots), mass_new (B, H_kv, n))`` from a decode pass's raw scores.

    ``scores`` is ``(B, H_kv, rows, slots + n)`` in log2 units (``-inf`` where masked), ``lse``
    the rows' final log-sum-exp ``(B, H_kv, rows)`` (log2). Given ``score_out`` ``(B, H_kv,
    held)`` and ``new_slots`` ``(B, H_kv, 1)`` (one new token), it also folds the mass in place:
    ``score_out = score_out * score_decay + mass_past``, plus ``mass_new`` at ``new_slots``.
    """
    batch, kv_heads, rows, total = scores.shape
    n = total - slots
    mass_past = torch.empty(batch, kv_heads, slots, dtype=torch.float32, device=scores.device)
    mass_new = torch.empty(batch, kv_heads, n, dtype=torch.float32, device=scores.device)
    fold = score_out is not None
    if fold and (n != 1 or new_slots is None or new_slots.shape[-1] != 1):
        raise ValueError("decode_mass folds the mass of one new token: give new_slots (B, H_kv, 1) and n = 1")
    target = score_out if fold else mass_past
    slot = new_slots if fold else mass_past
    block_r = min(16, triton.next_power_of_2(rows))  # a GQA group's rows (4 on Llama-3.1-8B) in one tile
    block = 2048 // block_r
    _decode_mass_kernel[(triton.cdiv(total, block), batch * kv_heads)](
        scores, *strides3(scores), lse, lse.stride(0), lse.stride(1), mass_past, mass_past.stride(0),
        mass_past.stride(1), mass_new, mass_new.stride(0), mass_new.stride(1), target, target.stride(0),
        target.stride(1), slot, slot.stride(0), slot.stride(1), float(score_decay), kv_heads, rows, slots, total,
        target.shape[-1] if fold else 0, BLOCK_R=block_r, BLOCK_N=block, FOLD=fold)
    return mass_past, mass_new

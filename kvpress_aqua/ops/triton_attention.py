"""Fused attention over a compressed layer in Triton: one pass over the held slots, never a score matrix.

:func:`triton_attention` computes what :func:`kvpress_aqua.ops.reference.reference_attention`
computes (``tests/test_triton_attention.py`` holds the two equal) with an online softmax, per tile
of query rows, over three key segments in one pass:

- **past**: the held slots, keys at their stored width (AQUA: ``r`` rotated channels, queries
  projected the same way), masked by per-slot visibility and, on sliding-window layers, by the
  window; split over the slot axis for decode steps (flash-decoding), so that one query row per
  sequence still fills the GPU;
- **exact**: AQUA's exact tokens at full width (their stored channels plus the kept residual
  channels), left out of the past segment, so attention to them is exact;
- **new**: the chunk's own raw keys, causal, with padding keys masked.

The queries of a GQA group share one pass over their KV head's keys (never expanded). The
attention mass each slot receives (H2O, TOVA) comes from a second pass with the saved
log-sum-exp for prefill chunks (working set ``O(BLOCK_M x BLOCK_N)``), and from the raw scores the
decode pass writes (``G x S`` floats per KV head).

On CUDA; under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (the tests use it on tiny
shapes in float32/float16: the interpreter's bfloat16 ``tl.dot`` is not usable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .inputs import AttentionInputs
from .triton_mass import decode_mass, pow2, precision, program_tile, segment_mass, strides3

__all__ = ["fused_attention", "triton_attention", "tuned_configs"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _online(acc, m_i, l_i, s, v, PRECISION: tl.constexpr):
    """One tile's step of the online softmax: scores ``s`` (log2 units, ``-inf`` where masked), values ``v``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _segment(acc, m_i, l_i, q, rows, row_ok, t, b, h,
             K, k_b, k_h, k_n, V, v_b, v_h, v_n, VIS, vis_b, vis_h, IDX, idx_b, idx_h, BIAS, bias_b, bias_h,
             lo, hi, first_index, window, scale_log2, SC, sc_b, sc_h, sc_r, sc_col,
             W: tl.constexpr, w, DV: tl.constexpr, dv, BLOCK_N: tl.constexpr,
             HAS_VIS: tl.constexpr, HAS_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, WRITE_SCORES: tl.constexpr,
             PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Online softmax of one tile of query rows over keys ``lo..hi-1`` of one segment."""
    ch = tl.arange(0, W)
    dch = tl.arange(0, DV)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        k = tl.load(K + b * k_b + h * k_h + cols[:, None] * k_n + ch[None, :],
                    mask=col_ok[:, None] & (ch[None, :] < w), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        if HAS_BIAS:  # a summary slot's log-weight, in log2 units
            s += tl.load(BIAS + b * bias_b + h * bias_h + cols, mask=col_ok, other=0.0)[None, :] * 1.4426950408889634
        mask = row_ok[:, None] & col_ok[None, :]
        if HAS_VIS:
            vis = tl.load(VIS + b * vis_b + h * vis_h + cols, mask=col_ok, other=0)
            mask = mask & (vis[None, :] != 0)
        if HAS_WINDOW:
            idx = tl.load(IDX + b * idx_b + h * idx_h + cols, mask=col_ok, other=0)
            mask = mask & (idx[None, :] > (first_index + t)[:, None] - window)
        if CAUSAL:
            mask = mask & (cols[None, :] <= t[:, None])
        s = tl.where(mask, s, float("-inf"))
        if WRITE_SCORES:
            tl.store(SC + b * sc_b + h * sc_h + rows[:, None] * sc_r + sc_col + cols[None, :], s,
                     mask=row_ok[:, None] & col_ok[None, :])
        v = tl.load(V + b * v_b + h * v_h + cols[:, None] * v_n + dch[None, :],
                    mask=col_ok[:, None] & (dch[None, :] < dv), other=0.0)
        acc, m_i, l_i = _online(acc, m_i, l_i, s, v, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _exact_segment(acc, m_i, l_i, q_a, q_e, row_ok, t, b, h,
                   KA, ka_b, ka_h, ka_n, EK, ek_b, ek_h, ek_n, VA, va_b, va_h, va_n, VIS, vis_b, vis_h,
                   IDX, idx_b, idx_h, BIAS, bias_b, bias_h, SLOT, sl_b, sl_h, E, first_index, window, scale_log2,
                   WA: tl.constexpr, wa, WE: tl.constexpr, we, DV: tl.constexpr, dv, BLOCK_N: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr):
    """AQUA's exact rows: each row's slot read in place, plus the row's own dropped key channels.

    The slot's stored channels, value, visibility, index and log-weight are read where they are, so
    the slot's score is the full-width one; a row of slot ``-1`` stands for no token.
    """
    ch_a = tl.arange(0, WA)
    ch_e = tl.arange(0, WE)
    dch = tl.arange(0, DV)
    for start in range(0, E, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        slot = tl.load(SLOT + b * sl_b + h * sl_h + cols, mask=cols < E, other=-1)
        ok = slot >= 0
        at = tl.where(ok, slot, 0)
        k_a = tl.load(KA + b * ka_b + h * ka_h + at[:, None] * ka_n + ch_a[None, :],
                      mask=ok[:, None] & (ch_a[None, :] < wa), other=0.0)
        k_e = tl.load(EK + b * ek_b + h * ek_h + cols[:, None] * ek_n + ch_e[None, :],
                      mask=ok[:, None] & (ch_e[None, :] < we), other=0.0)
        s = (tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)
             + tl.dot(q_e, tl.trans(k_e), input_precision=PRECISION)) * scale_log2
        if HAS_BIAS:
            s += tl.load(BIAS + b * bias_b + h * bias_h + at, mask=ok, other=0.0)[None, :] * 1.4426950408889634
        vis = tl.load(VIS + b * vis_b + h * vis_h + at, mask=ok, other=0)
        mask = row_ok[:, None] & (ok & (vis != 0))[None, :]
        if HAS_WINDOW:
            idx = tl.load(IDX + b * idx_b + h * idx_h + at, mask=ok, other=0)
            mask = mask & (idx[None, :] > (first_index + t)[:, None] - window)
        s = tl.where(mask, s, float("-inf"))
        v = tl.load(VA + b * va_b + h * va_h + at[:, None] * va_n + dch[None, :],
                    mask=ok[:, None] & (dch[None, :] < dv), other=0.0)
        acc, m_i, l_i = _online(acc, m_i, l_i, s, v, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attention_kernel(
    QA, qa_b, qa_h, qa_r, KA, ka_b, ka_h, ka_n, VA, va_b, va_h, va_n, VISA, visa_b, visa_h, IDXA, idxa_b, idxa_h,
    BA, ba_b, ba_h,
    QE, qe_b, qe_h, qe_r, EK, ek_b, ek_h, ek_n, VISB, visb_b, visb_h, SLOT, sl_b, sl_h,
    QC, qc_b, qc_h, qc_r, KC, kc_b, kc_h, kc_n, VC, vc_b, vc_h, vc_n, VALC, valc_b,
    OUT, o_s, o_b, o_h, o_r, LSE, l_s, l_b, l_h, SC, sc_b, sc_h, sc_r,
    kv_heads, rows_total, n, S, E, split_len, first_index, window, scale_log2, wa, wb, we, dv,
    WA: tl.constexpr, WB: tl.constexpr, WE: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_A: tl.constexpr, HAS_B: tl.constexpr, HAS_C: tl.constexpr, HAS_WINDOW: tl.constexpr,
    WRITE_SCORES: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    b, h, rows = program_tile(kv_heads, BLOCK_M)
    split = tl.program_id(2)
    row_ok = rows < rows_total
    t = rows % n  # rows are (group member, chunk position), position fastest
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)
    if HAS_A:
        ch_a = tl.arange(0, WA)
        q_a = tl.load(QA + b * qa_b + h * qa_h + rows[:, None] * qa_r + ch_a[None, :],
                      mask=row_ok[:, None] & (ch_a[None, :] < wa), other=0.0)
        lo = split * split_len
        hi = tl.minimum(S, lo + split_len)
        acc, m_i, l_i = _segment(acc, m_i, l_i, q_a, rows, row_ok, t, b, h, KA, ka_b, ka_h, ka_n, VA, va_b, va_h, va_n,
                                 VISA, visa_b, visa_h, IDXA, idxa_b, idxa_h, BA, ba_b, ba_h, lo, hi, first_index,
                                 window, scale_log2,
                                 SC, sc_b, sc_h, sc_r, 0, WA, wa, DV, dv, BLOCK_N, True, HAS_WINDOW, False,
                                 WRITE_SCORES, PRECISION, HAS_BIAS)
    if split == 0:
        if HAS_B:
            ch_a = tl.arange(0, WA)
            q_a = tl.load(QA + b * qa_b + h * qa_h + rows[:, None] * qa_r + ch_a[None, :],
                          mask=row_ok[:, None] & (ch_a[None, :] < wa), other=0.0)
            ch_e = tl.arange(0, WE)
            q_e = tl.load(QE + b * qe_b + h * qe_h + rows[:, None] * qe_r + ch_e[None, :],
                          mask=row_ok[:, None] & (ch_e[None, :] < we), other=0.0)
            acc, m_i, l_i = _exact_segment(acc, m_i, l_i, q_a, q_e, row_ok, t, b, h, KA, ka_b, ka_h, ka_n, EK, ek_b,
                                           ek_h, ek_n, VA, va_b, va_h, va_n, VISB, visb_b, visb_h, IDXA, idxa_b,
                                           idxa_h, BA, ba_b, ba_h, SLOT, sl_b, sl_h, E, first_index, window,
                                           scale_log2, WA, wa, WE, we, DV, dv, BLOCK_N, HAS_WINDOW, PRECISION,
                                           HAS_BIAS)
        if HAS_C:
            ch_c = tl.arange(0, WB)
            q_c = tl.load(QC + b * qc_b + h * qc_h + rows[:, None] * qc_r + ch_c[None, :],
                          mask=row_ok[:, None] & (ch_c[None, :] < wb), other=0.0)
            acc, m_i, l_i = _segment(acc, m_i, l_i, q_c, rows, row_ok, t, b, h, KC, kc_b, kc_h, kc_n, VC, vc_b, vc_h,
                                     vc_n, VALC, valc_b, 0, VALC, valc_b, 0, VALC, valc_b, 0, 0, n, first_index, window,
                                     scale_log2,
                                     SC, sc_b, sc_h, sc_r, S, WB, wb, DV, dv, BLOCK_N, True, False, True, WRITE_SCORES,
                                     PRECISION, False)
    dch = tl.arange(0, DV)
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(OUT + split * o_s + b * o_b + h * o_h + rows[:, None] * o_r + dch[None, :], out,
             mask=row_ok[:, None] & (dch[None, :] < dv))
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(LSE + split * l_s + b * l_b + h * l_h + rows, lse, mask=row_ok)


@triton.jit
def _combine_kernel(OUT, o_s, o_b, o_h, o_r, LSE, l_s, l_b, l_h, MERGED, m_b, m_h, m_r, TOTAL, t_b, t_h,
                    kv_heads, rows_total, splits, dv, SPLITS: tl.constexpr, DV: tl.constexpr, BLOCK_R: tl.constexpr):
    """Merge the splits of the past (flash-decoding): outputs weighted by their share of the total softmax."""
    b, h, rows = program_tile(kv_heads, BLOCK_R)
    row_ok = rows < rows_total
    part = tl.arange(0, SPLITS)
    lse = tl.load(LSE + part[:, None] * l_s + b * l_b + h * l_h + rows[None, :],
                  mask=(part < splits)[:, None] & row_ok[None, :], other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp2(lse - top[None, :]), 0)
    seen = total > 0
    total_lse = tl.where(seen, top + tl.log2(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(TOTAL + b * t_b + h * t_h + rows, total_lse, mask=row_ok)
    dch = tl.arange(0, DV)
    acc = tl.zeros([BLOCK_R, DV], tl.float32)
    base = tl.where(seen, total_lse, 0.0)
    for i in range(0, splits):
        share = tl.load(LSE + i * l_s + b * l_b + h * l_h + rows, mask=row_ok, other=float("-inf"))
        share = tl.where(seen, tl.exp2(share - base), 0.0)
        out = tl.load(OUT + i * o_s + b * o_b + h * o_h + rows[:, None] * o_r + dch[None, :],
                      mask=row_ok[:, None] & (dch[None, :] < dv), other=0.0)
        acc += share[:, None] * out
    tl.store(MERGED + b * m_b + h * m_h + rows[:, None] * m_r + dch[None, :], acc.to(MERGED.dtype.element_ty),
             mask=row_ok[:, None] & (dch[None, :] < dv))


_DECODE_BLOCK_N = 128
"""The largest ``BLOCK_N`` of the tuned decode configurations: a decode split's length is a multiple of it."""

_attention_decode = triton.autotune(
    configs=[triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
             for block_n in (64, _DECODE_BLOCK_N) for warps in (4, 8) for stages in (2, 3)],
    key=["WA", "WB", "WE", "DV", "BLOCK_M", "HAS_B", "HAS_WINDOW", "WRITE_SCORES", "HAS_BIAS"],
)(_attention_kernel)
"""The decode pass on CUDA, its tile width, warps and pipeline depth measured once per kernel variant (the
first call of each; a CUDA graph's warm-up run makes it before the capture)."""


def tuned_configs() -> dict[str, str]:
    """The decode configuration measured best for each kernel variant run so far, for benchmark reports.

    Keys are the variants' widths and segments (the autotuner's key), values the chosen configurations.
    """
    return {str(key): str(config) for key, config in _attention_decode.cache.items()}


def _splits(slots: int, programs: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """Split the past over ``splits`` programs each when the row tiles alone would not fill the GPU."""
    if slots == 0:
        return 1, block_n
    units = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    splits = max(1, min(triton.cdiv(slots, 4 * block_n), triton.cdiv(4 * units, programs)))
    split_len = triton.cdiv(triton.cdiv(slots, splits), block_n) * block_n
    return triton.cdiv(slots, split_len), split_len


def _key_validity(new_mask: torch.Tensor, batch: int, n: int) -> torch.Tensor | None:
    """int8 ``(B, n)`` key validity if ``new_mask`` is exactly causal & key validity, else ``None``."""
    valid = new_mask.diagonal(dim1=-2, dim2=-1).reshape(-1, n).expand(batch, n)
    causal = torch.ones(n, n, dtype=torch.bool, device=new_mask.device).tril()
    if not torch.equal(new_mask.reshape(-1, n, n).expand(batch, n, n), causal & valid[:, None, :]):
        return None
    return valid.to(torch.int8).contiguous()


def triton_attention(
    inputs: AttentionInputs, query: torch.Tensor, new_mask: torch.Tensor, scale: float, softcap: float | None = None,
    with_lse: bool = False,
) -> tuple[torch.Tensor, ...] | None:
    """:func:`~kvpress_aqua.ops.reference.reference_attention` in one fused pass; ``None`` where it does not apply.

    Parameters and returns are the reference's. It does not apply (returns ``None``, the caller
    runs the reference) with logit soft-capping, with a chunk mask other than causal plus key
    padding, or on a sliding-window layer of a static cache. Where it applies and
    ``inputs.score_out`` is set (a static decode step), it also folds the mass into that buffer,
    as :func:`~kvpress_aqua.ops.reference.fold_scores` does. The work is the custom op
    ``torch.ops.kvpress_aqua.fused_attention``, which ``torch.compile`` keeps whole (a CUDA graph
    records its launches).
    """
    first_index = inputs.first_index
    if isinstance(first_index, torch.Tensor):  # a static decode step: only window layers read it
        if inputs.window is not None:
            return None
        first_index = 0
    if softcap is not None:
        return None
    batch, _, n, _ = query.shape
    if n > 1:
        key_valid = _key_validity(new_mask, batch, n)
        if key_valid is None:
            return None
    else:
        key_valid = new_mask.reshape(-1, 1).expand(batch, 1).to(torch.int8).contiguous()
    exact = inputs.exact_keys is not None and inputs.past_keys.shape[-2] > 0
    result = torch.ops.kvpress_aqua.fused_attention(
        query, inputs.past_keys, inputs.past_values, inputs.past_visible, inputs.keys_new, inputs.values_new,
        key_valid, inputs.past_index if inputs.window is not None else None, inputs.past_log_weight, inputs.key_basis,
        inputs.exact_keys if exact else None, inputs.exact_basis if exact else None,
        inputs.exact_slot if exact else None, scale, inputs.query_channels, inputs.window, first_index,
        inputs.want_mass, max(0, n - inputs.mass_rows) if inputs.mass_rows is not None else 0,
        inputs.score_out, inputs.new_slots, inputs.score_decay,
    )
    return result if with_lse else result[:3]


def _merge(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output, lse)`` of the whole past from its splits' ``(splits, B, H_kv, rows, dv)`` and ``(splits, ...)``."""
    splits, batch, kv_heads, rows, dv = out.shape
    if splits == 1:
        return out[0], lse[0]
    merged = torch.empty(batch, kv_heads, rows, dv, dtype=dtype, device=out.device)
    total = torch.empty(batch, kv_heads, rows, dtype=torch.float32, device=out.device)
    block_r = 16
    _combine_kernel[(triton.cdiv(rows, block_r), batch * kv_heads)](
        out, out.stride(0), out.stride(1), out.stride(2), out.stride(3), lse, lse.stride(0), lse.stride(1),
        lse.stride(2), merged, *strides3(merged), total, total.stride(0), total.stride(1),
        kv_heads, rows, splits, dv, SPLITS=triton.next_power_of_2(splits), DV=pow2(dv), BLOCK_R=block_r)
    return merged, total


@torch.library.custom_op("kvpress_aqua::fused_attention", mutates_args=("score_out",))
def fused_attention(
    query: torch.Tensor, past_keys: torch.Tensor, past_values: torch.Tensor, past_visible: torch.Tensor,
    keys_new: torch.Tensor, values_new: torch.Tensor, key_valid: torch.Tensor, past_index: torch.Tensor | None,
    past_log_weight: torch.Tensor | None, key_basis: torch.Tensor | None, exact_keys: torch.Tensor | None,
    exact_basis: torch.Tensor | None, exact_slot: torch.Tensor | None, scale: float, query_channels: int | None,
    window: int | None, first_index: int, want_mass: bool, mass_from: int, score_out: torch.Tensor | None,
    new_slots: torch.Tensor | None, score_decay: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused attention on plain tensors (the fields of :class:`~kvpress_aqua.ops.inputs.AttentionInputs`).

    ``key_valid`` is the int8 ``(B, n)`` validity of the chunk's keys (its mask is causal); the
    exact-token tensors are given together or not at all; only query rows ``t >= mass_from`` give mass
    (one decode query always does). Given ``score_out`` (a static decode step's score buffer) it folds
    the mass into it in place (see :func:`~kvpress_aqua.ops.reference.fold_scores`). No argument has a
    default: torch 2.11 drops trailing arguments equal to their defaults before it finds the mutated one.
    Returns ``(output, mass_past, mass_new, lse)``, ``lse`` each query's float32 log-sum-exp
    ``(B, H, n)`` (natural log, ``-inf`` where it sees nothing).
    """
    batch, heads, n, d = query.shape
    kv_heads = keys_new.shape[1]
    group = heads // kv_heads
    rows = group * n
    slots = past_keys.shape[-2]
    exact = exact_keys is not None
    dv = values_new.shape[-1]
    scale_log2 = scale * LOG2E
    q_raw = query.reshape(batch, kv_heads, group, n, d).reshape(batch, kv_heads, rows, d).contiguous()
    qa = q_raw
    if slots and key_basis is not None:
        qa = q_raw @ key_basis
        if query_channels is not None and query_channels < qa.shape[-1]:
            top = qa.abs().topk(query_channels, dim=-1).indices
            qa = torch.zeros_like(qa).scatter_(-1, top, qa.gather(-1, top))
    qa = qa.contiguous()
    visible_a = past_visible
    if exact:  # segment B reads each exact row's slot in place; the slot leaves the past segment
        row_valid = exact_slot >= 0
        at = exact_slot.clamp_min(0)
        q_e = (q_raw @ exact_basis).contiguous()
        visible_a = visible_a.to(torch.int8).scatter_reduce(2, at, (~row_valid).to(torch.int8), "amin")
    else:
        q_e = exact_keys = exact_slot = q_raw  # placeholders: segment B is compiled out
    index = past_index if window is not None else visible_a
    block_m = 16 if rows <= 16 else 64
    tuned = n == 1 and query.is_cuda
    block_n = _DECODE_BLOCK_N if tuned else 64
    row_tiles = triton.cdiv(rows, block_m)
    splits, split_len = _splits(slots, row_tiles * batch * kv_heads, block_n, query.device)
    out_dtype = values_new.dtype if splits == 1 else torch.float32
    out = torch.empty(splits, batch, kv_heads, rows, dv, dtype=out_dtype, device=query.device)
    lse = torch.empty(splits, batch, kv_heads, rows, dtype=torch.float32, device=query.device)
    write_scores = want_mass and n == 1
    scores = (torch.empty(batch, kv_heads, rows, slots + n, dtype=torch.float32, device=query.device)
              if write_scores else lse)
    bias_a = past_log_weight if past_log_weight is not None else lse
    kernel, config = (_attention_decode, {}) if tuned else (_attention_kernel, {"BLOCK_N": block_n})
    kernel[(row_tiles, batch * kv_heads, splits)](
        qa, *strides3(qa), past_keys, *strides3(past_keys), past_values, *strides3(past_values), visible_a,
        visible_a.stride(0), visible_a.stride(1), index, index.stride(0), index.stride(1),
        bias_a, bias_a.stride(0), bias_a.stride(1),
        q_e, *strides3(q_e), exact_keys, *strides3(exact_keys), past_visible, past_visible.stride(0),
        past_visible.stride(1), exact_slot, exact_slot.stride(0), exact_slot.stride(1),
        q_raw, *strides3(q_raw), keys_new, *strides3(keys_new), values_new, *strides3(values_new), key_valid,
        key_valid.stride(0),
        out, out.stride(0), out.stride(1), out.stride(2), out.stride(3), lse, lse.stride(0), lse.stride(1),
        lse.stride(2), scores, scores.stride(0), scores.stride(1), scores.stride(2) if write_scores else 0,
        kv_heads, rows, n, slots, exact_slot.shape[-1] if exact else 0, split_len, first_index,
        window or 0, scale_log2, qa.shape[-1], d, q_e.shape[-1], dv,
        WA=pow2(qa.shape[-1]), WB=pow2(d), WE=pow2(q_e.shape[-1]), DV=pow2(dv), BLOCK_M=block_m,
        HAS_A=slots > 0, HAS_B=exact, HAS_C=True, HAS_WINDOW=window is not None and slots > 0,
        WRITE_SCORES=write_scores, PRECISION=precision(qa), HAS_BIAS=past_log_weight is not None, **config,
    )
    merged, total_lse = _merge(out, lse, values_new.dtype)
    output = merged.reshape(batch, kv_heads, group, n, dv).reshape(batch, heads, n, dv)
    row_lse = (total_lse * LN2).reshape(batch, heads, n)
    if not want_mass:
        return (output, torch.zeros(batch, kv_heads, slots, dtype=torch.float32, device=query.device),
                torch.zeros(batch, kv_heads, n, dtype=torch.float32, device=query.device), row_lse)
    folds = write_scores and score_out is not None and not exact
    if write_scores:  # one small pass over the written scores gives both masses (and folds them, where it can)
        mass_past, mass_new = decode_mass(scores, total_lse, slots, *((score_out, new_slots, score_decay)
                                                                    if folds else ()))
    else:
        mass_past = (segment_mass(qa, past_keys, visible_a, total_lse, n, scale_log2, past_index, window,
                                  first_index, bias=past_log_weight, row_from=mass_from) if slots else
                     torch.zeros(batch, kv_heads, 0, dtype=torch.float32, device=query.device))
        mass_new = segment_mass(q_raw, keys_new, key_valid[:, None, :].expand(batch, kv_heads, n), total_lse, n,
                                scale_log2, causal=True, row_from=mass_from)
    if exact:  # the exact rows' mass, from their full-width keys gathered for it
        kb = torch.cat([past_keys.gather(2, at[..., None].expand(-1, -1, -1, past_keys.shape[-1])), exact_keys], -1)
        visible_b = (row_valid & past_visible.gather(2, at)).to(torch.int8)
        bias_b = past_log_weight.gather(2, at).contiguous() if past_log_weight is not None else None
        index_b = past_index.gather(2, at).contiguous() if window is not None else visible_b
        mass_b = segment_mass(torch.cat([qa, q_e], -1).contiguous(), kb, visible_b, total_lse, n, scale_log2,
                              index_b, window, first_index, bias=bias_b, row_from=mass_from)
        mass_past = mass_past.scatter_add(2, at, mass_b)
    if score_out is not None and not folds:
        reference.fold_scores(score_out, score_decay, mass_past, mass_new, new_slots)
    return output, mass_past, mass_new, row_lse


@fused_attention.register_fake
def _(query, past_keys, past_values, past_visible, keys_new, values_new, key_valid, past_index, past_log_weight,
      key_basis, exact_keys, exact_basis, exact_slot, scale, query_channels, window, first_index, want_mass,
      mass_from, score_out, new_slots, score_decay):
    batch, heads, n, _ = query.shape
    kv_heads, slots = keys_new.shape[1], past_keys.shape[-2]
    return (query.new_empty(batch, heads, n, values_new.shape[-1], dtype=values_new.dtype),
            query.new_empty(batch, kv_heads, slots, dtype=torch.float32),
            query.new_empty(batch, kv_heads, n, dtype=torch.float32),
            query.new_empty(batch, heads, n, dtype=torch.float32))

"""The fused Triton attention equals the reference attention: every segment, mask and output, on tiny shapes.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``),
so a broken kernel fails CI, not only the GPU run; the interpreter cannot run bfloat16 products, so
the CPU run checks float32 and float16.
"""

import pytest
import torch

from kvpress_aqua.ops.inputs import AttentionInputs
from kvpress_aqua.ops.reference import fold_scores, reference_attention

triton_attention = pytest.importorskip("kvpress_aqua.ops.triton_attention").triton_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _case(seed, dtype, *, batch=2, kv_heads=2, group=2, d=16, slots=37, n=5, pruned=0, exact=0, window=None,
          want_mass=True, query_channels=None, pad=(0, 2), weighted=False, mass_rows=None):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    r = d - pruned
    basis = torch.linalg.qr(torch.randn(kv_heads, d, d, generator=gen)).Q.to(DEVICE, dtype) if pruned else None
    index = torch.stack([torch.randperm(slots, generator=gen) for _ in range(batch * kv_heads)]).view(
        batch, kv_heads, slots).to(torch.int32)
    inputs = AttentionInputs(
        layer_idx=0,
        past_keys=rand(batch, kv_heads, slots, r),
        past_values=rand(batch, kv_heads, slots, d),
        past_visible=(torch.rand(batch, kv_heads, slots, generator=gen) > 0.3).to(DEVICE),
        keys_new=rand(batch, kv_heads, n, d),
        values_new=rand(batch, kv_heads, n, d),
        past_index=index.to(DEVICE) if window else None,
        past_log_weight=(torch.rand(batch, kv_heads, slots, generator=gen) * 2).to(DEVICE) if weighted else None,
        window=window,
        first_index=slots,
        key_basis=basis[:, :, :r].contiguous() if pruned else None,
        query_channels=query_channels,
        want_mass=want_mass,
        mass_rows=mass_rows,
    )
    if exact:
        slot = torch.randint(0, slots, (batch, kv_heads, exact), generator=gen)
        slot[:, :, 0] = -1  # a blank row
        slot = torch.stack([torch.randperm(slots, generator=gen)[:exact] for _ in range(batch * kv_heads)]).view(
            batch, kv_heads, exact).where(slot >= 0, -1)
        keys = rand(batch, kv_heads, exact, pruned) * (slot >= 0).to(DEVICE, dtype)[..., None]
        inputs.exact_keys, inputs.exact_basis, inputs.exact_slot = keys, basis[:, :, r:].contiguous(), slot.to(DEVICE)
    query = rand(batch, kv_heads * group, n, d)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    valid = torch.stack([torch.arange(n) >= p for p in pad])  # left padding per row
    mask = (causal & valid[:, None, :])[:, None].to(DEVICE)
    return inputs, query, mask


def _check(inputs, query, mask, dtype):
    got = triton_attention(inputs, query, mask, 0.25)
    assert got is not None
    want = reference_attention(inputs, query, mask, 0.25)
    for name, a, b in zip(("output", "mass_past", "mass_new"), got, want, strict=True):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        err = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)
        assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kw", [
    dict(), dict(slots=0), dict(n=1), dict(n=1, slots=300), dict(n=23, slots=70), dict(pruned=8),
    dict(pruned=8, exact=6), dict(pruned=8, exact=6, n=1), dict(window=9), dict(window=9, n=1),
    dict(pruned=8, query_channels=4), dict(group=1), dict(group=4, kv_heads=1), dict(want_mass=False),
    dict(pad=(3, 0), n=7), dict(d=24, pruned=8), dict(weighted=True), dict(weighted=True, n=1),
    dict(weighted=True, pruned=8, exact=6), dict(mass_rows=2), dict(mass_rows=3, pruned=8, exact=6, window=9),
    dict(mass_rows=1, n=1), dict(pruned=8, exact=6, window=9), dict(pruned=8, exact=6, window=9, n=1),
    dict(n=1, slots=700, weighted=True), dict(n=1, slots=1000, group=4, pruned=8, exact=6), dict(n=1, group=1),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_fused_attention_equals_the_reference(dtype, kw):
    inputs, query, mask = _case(0, dtype, **kw)
    _check(inputs, query, mask, dtype)


def test_only_the_last_mass_rows_give_mass():
    """SnapKV's observation window: the mass of the last rows equals that of the dense softmax's last rows."""
    inputs, query, mask = _case(3, torch.float32, n=6, pad=(0, 0), mass_rows=2)
    inputs.past_visible = torch.ones_like(inputs.past_visible)
    _, mass_past, mass_new = reference_attention(inputs, query, mask, 0.25)
    batch, heads, n, d = query.shape
    kv_heads = inputs.keys_new.shape[1]
    keys = torch.cat([inputs.past_keys, inputs.keys_new], 2).repeat_interleave(heads // kv_heads, 1)
    sees = torch.cat([torch.ones(n, keys.shape[2] - n, dtype=torch.bool), mask[0, 0].cpu()], -1).to(DEVICE)
    logits = (query @ keys.transpose(-1, -2) * 0.25).masked_fill(~sees, float("-inf"))
    dense = logits.softmax(-1)[:, :, -2:].sum(2).view(batch, kv_heads, -1, keys.shape[2]).sum(2)
    torch.testing.assert_close(torch.cat([mass_past, mass_new], -1), dense)
    inputs.mass_rows = None
    assert not torch.allclose(reference_attention(inputs, query, mask, 0.25)[1], mass_past)


def test_a_query_that_sees_nothing_gets_zero_and_gives_no_mass():
    inputs, query, mask = _case(1, torch.float32, slots=0, n=4, pad=(4, 0))
    out, _, mass_new = triton_attention(inputs, query, mask, 0.25)
    assert out[0].abs().max() == 0 and mass_new[0].abs().max() == 0


def test_masks_and_options_it_cannot_run_fall_back():
    inputs, query, mask = _case(2, torch.float32, n=6)
    assert triton_attention(inputs, query, mask, 0.25, softcap=30.0) is None
    assert triton_attention(inputs, query, torch.ones_like(mask), 0.25) is None  # not causal


@pytest.mark.parametrize("decay", [1.0, 0.0, 0.5])
@pytest.mark.parametrize("kw", [dict(), dict(slots=700), dict(pruned=8, exact=6)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_a_static_decode_step_folds_its_mass_into_the_score_buffer(decay, kw):
    """H2O's decay 1, TOVA's 0: the buffer ends as the reference's fold of the reference's masses."""
    inputs, query, mask = _case(4, torch.float32, n=1, pad=(0, 0), **kw)
    batch, kv_heads, slots = inputs.past_visible.shape
    gen = torch.Generator().manual_seed(5)
    before = torch.rand(batch, kv_heads, slots, generator=gen).to(DEVICE)
    slot = torch.randint(0, slots, (batch, kv_heads, 1), generator=gen).to(DEVICE)
    inputs.past_visible = inputs.past_visible.scatter(2, slot, False)  # the new token's slot, as a static step's
    inputs.score_out, inputs.new_slots, inputs.score_decay = before.clone(), slot, decay
    got = triton_attention(inputs, query, mask, 0.25)
    want = before.clone()
    _, mass_past, mass_new = reference_attention(inputs, query, mask, 0.25)
    fold_scores(want, decay, mass_past, mass_new, slot)
    torch.testing.assert_close(inputs.score_out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], mass_past, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(inputs.score_out, before)

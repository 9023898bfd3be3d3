"""Property tests (hypothesis), tensor level: one layer's invariants over random shapes x policies x batch x
padding x chunking.

One :class:`~kvpress_aqua.core.layer.CompressedLayer` driven through its ``update()``
contract with random post-RoPE keys, values and queries (the attention call that follows is
:func:`~kvpress_aqua.attention.dispatch.compressed_attention`, as in a model), over random KV heads,
GQA groups, head widths, dtypes, the model's own sliding window, left padding and any sequence
of chunk sizes. After every update it checks what the docs promise (docs/cache.md, the policies'
docstrings): held <= budget + n while a chunk of n is attended and <= budget + 1 after it, never
fewer than the budget allows, held tokens are real, unique and at their original positions, the
protected tokens (sinks, recent, a sliding window) are held, AQUA's exact rows point at the
right tokens, the attention equals plain attention over exactly the held tokens, and ``nbytes()``
is the sum of the held tensors and the byte formula of ``core/accounting.py``.

The model level (whole caches on tiny decoders) is in test_properties_model.py; the hypothesis profiles
both use are in property_settings.py. Examples are derandomized (the same ones on every run, CI
reproducible) and sized to run in about a minute on one core. ``KVPRESS_HYPOTHESIS=thorough`` runs 10x
the examples with fresh randomness (``KVPRESS_HYPOTHESIS_SCALE`` sets another factor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import Phase, given, note
from hypothesis import strategies as st
from property_settings import TOL, examples

from kvpress_aqua import ModelInfo
from kvpress_aqua.artifacts.aqua import AquaArtifact
from kvpress_aqua.attention import dispatch
from kvpress_aqua.core.accounting import (
    GROWTH_DIVISOR,
    GROWTH_MIN,
    capped_budget,
    decode_slots,
    layer_nbytes,
    prefill_slots,
)
from kvpress_aqua.core.layer import CompressedLayer
from kvpress_aqua.policies import H2O, TOVA, SlidingWindow
from kvpress_aqua.policies.aqua import Aqua

# ----------------------------------------------------------------------------------- policies
_heavy = st.integers(0, 8) | st.integers(9, 40)  # some budgets large enough for a decode buffer to grow
_knobs = st.tuples(_heavy, st.integers(0, 6), st.integers(0, 3)).filter(lambda t: sum(t) > 0)
_SLIDING = st.builds(SlidingWindow, sinks=st.integers(0, 3), window=st.integers(1, 10))
_H2O = _knobs.map(lambda t: H2O(heavy=t[0], recent=t[1], sinks=t[2]))
_TOVA = _knobs.map(lambda t: TOVA(heavy=t[0], recent=t[1], sinks=t[2]))
TOKEN_POLICIES = st.one_of(st.none(), _SLIDING, _H2O, _TOVA)
AQUA_KNOBS = st.fixed_dictionaries({
    "k_ratio": st.sampled_from([0.25, 0.5, 0.75, 1.0]),
    "basis": st.sampled_from(["identity", "svd", "think"]),
    "per_layer": st.sampled_from(["uniform", "spectrum"]),
    "exact_sinks": st.integers(0, 3),
    "exact_recent": st.integers(0, 6),
})
"""Aqua's knobs (the policy itself is built per example: binding it to a model mutates it)."""


def _random_artifact(info: ModelInfo, seed: int) -> AquaArtifact:
    """Random orthogonal bases with a descending spectrum: what ``calibrate`` would produce, for any shape."""
    gen = torch.Generator().manual_seed(seed)
    shape = (info.num_layers, info.num_kv_heads, info.head_dim)
    q, _ = torch.linalg.qr(torch.randn(*shape, info.head_dim, generator=gen))
    spectrum = torch.rand(*shape, generator=gen).sort(-1, descending=True).values + 0.01
    spectrum = spectrum * (2 / spectrum.pow(2).sum(-1, keepdim=True)).sqrt()
    return AquaArtifact(q.contiguous(), spectrum, torch.rand(*shape, generator=gen) + 0.1,
                        torch.rand(*shape, generator=gen) + 0.1,
                        {"model": info.name, "fingerprint": info.fingerprint})


# ------------------------------------------------------------------------------ tensor level
@dataclass
class Scenario:
    """One random run of a layer: shapes, policies, padding and the sizes of its updates in order."""

    batch: int
    kv_heads: int
    group: int
    head_dim: int
    layer_idx: int
    window: int | None
    dtype: torch.dtype
    token: object
    aqua: dict | None
    pads: list[int]
    prompt: int
    sizes: list[int]
    chunk: int | None = None
    """Set when the prompt was fed in uniform chunks of ``chunk`` and only decode steps followed (the
    schedule :func:`~kvpress_aqua.core.accounting.decode_slots` predicts)."""
    seed: int = 0
    uniform: bool = False


@st.composite
def scenarios(draw, uniform: bool | None = None, single_token_tail: bool = False,
              lone_padding: bool = False) -> Scenario:
    """``lone_padding``: mostly the case of :func:`_padding_alone_with_exact_ring` (AQUA pruning with an exact
    ring, a 1-token update holding a padding token), which that filter then makes sure of."""
    token = draw(TOKEN_POLICIES)
    if lone_padding:
        aqua = draw(AQUA_KNOBS.filter(lambda k: k["k_ratio"] < 1 and k["exact_recent"] > 0))
    else:
        aqua = draw(st.none() | AQUA_KNOBS) if token is not None else draw(AQUA_KNOBS)
    head_dim = draw(st.sampled_from([8, 16]))
    window = draw(st.none() | st.integers(2, 12))
    if window is not None and isinstance(token, SlidingWindow | H2O) and token.sinks > window - 1:
        window = token.sinks + 1  # the cache refuses sinks that do not fit the model's window
    batch = draw(st.integers(1, 3))
    prompt = draw(st.integers(2 if lone_padding else 1, 20))
    pads = [draw(st.integers(0, prompt - 1)) for _ in range(batch)]
    if lone_padding and max(pads) == 0:
        pads[0] = draw(st.integers(1, prompt - 1))
    uniform = False if lone_padding else draw(st.booleans()) if uniform is None else uniform
    chunk = None
    if uniform:
        if single_token_tail:  # the prompt's last chunk is a single token
            chunk = draw(st.integers(1, prompt - 1)) if prompt > 1 and draw(st.booleans()) else None
            if chunk is not None:
                prompt = chunk * draw(st.integers(1, max(1, 20 // chunk))) + 1
                pads = [min(p, prompt - 1) for p in pads]
            else:
                prompt, pads = 1, [0] * batch
        else:
            chunk = draw(st.none() | st.integers(1, prompt))
        step = chunk or prompt
        sizes = [min(step, prompt - lo) for lo in range(0, prompt, step)]
        sizes += [1] * draw(st.integers(0, 10) | st.integers(11, 40))  # long enough to grow a buffer
    else:
        cuts = draw(st.sets(st.integers(1, prompt - 1), max_size=4)) if prompt > 1 else set()
        if lone_padding:  # a 1-token piece [t, t + 1) among the padding of the most padded row
            t = draw(st.integers(0, max(pads) - 1))
            cuts |= {t, t + 1} - {0}
        cuts = sorted(cuts)
        bounds = [0, *cuts, prompt]
        sizes = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
        sizes += draw(st.lists(st.sampled_from([1, 1, 1, 2, 3, 5]), max_size=10))
    return Scenario(batch=batch, kv_heads=draw(st.integers(1, 3)), group=draw(st.integers(1, 2)), head_dim=head_dim,
                    layer_idx=draw(st.integers(0, 1)), window=window,
                    dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])), token=token,
                    aqua=aqua, pads=pads, prompt=prompt, sizes=sizes, chunk=chunk if uniform else None,
                    seed=draw(st.integers(0, 2**16)), uniform=uniform)


class _AttentionModule:
    """What ``compressed_attention`` reads of a model's attention module."""

    def __init__(self, layer_idx: int) -> None:
        self.layer_idx = layer_idx


def _build_layer(sc: Scenario) -> tuple[CompressedLayer, Aqua | None]:
    info = ModelInfo(model_type="llama", num_layers=2, num_heads=sc.kv_heads * sc.group, num_kv_heads=sc.kv_heads,
                     head_dim=sc.head_dim, sliding_window=sc.window,
                     layer_types=("sliding_attention" if sc.window else "full_attention",) * 2,
                     name="property-test", fingerprint=f"prop-{sc.kv_heads}-{sc.group}-{sc.head_dim}")
    aqua = None
    if sc.aqua is not None:
        aqua = Aqua(**sc.aqua, artifact=_random_artifact(info, sc.seed))
        aqua.bind(info, torch.device("cpu"), sc.dtype)
    layer = CompressedLayer(sc.layer_idx, sc.kv_heads, sc.head_dim, sc.token, aqua, sc.window)
    return layer, aqua


def _gather(hist: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``hist[b, h, index[b, h, s]]``: ``(B, H, T, D)`` at ``(B, H, S)`` -> ``(B, H, S, D)``."""
    at = index.clamp_min(0).long()[..., None].expand(-1, -1, -1, hist.shape[-1])
    return hist.gather(2, at)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    if dtype == torch.float32:
        return bool(torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-5))
    return bool(torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2))


def _oracle_attention(sc, layer, aqua, inputs, index, q, k, v, new_mask, k_hist, v_hist, lo) -> torch.Tensor:
    """Plain softmax attention of ``q`` over exactly the past tokens the layer says it shows, and the chunk.

    Keys come from the raw history by each slot's ``index``: a slot among AQUA's exact rows is exact,
    any other under AQUA is scored by its leading channels (``q @ P_r . k @ P_r``).
    """
    batch, heads, n, d = q.shape
    past = inputs.past_keys.shape[-2]
    if aqua is not None and layer.key_dim < d:
        basis = aqua.key_basis(sc.layer_idx).float()  # (H, d, r)
        keep = basis @ basis.transpose(-1, -2)
        pruned = torch.einsum("bhtd,hde->bhte", k_hist.float(), keep)
    else:
        pruned = k_hist.float()
    exact = torch.zeros(batch, sc.kv_heads, past + 1, dtype=torch.bool)
    if inputs.exact_slot is not None:
        exact.scatter_(2, inputs.exact_slot.where(inputs.exact_slot >= 0, past), True)
    exact = exact[..., :past]
    keys_past = torch.where(exact[..., None], _gather(k_hist.float(), index), _gather(pruned, index))
    values_past = _gather(v_hist.float(), index)
    seen = inputs.past_visible[:, :, None, :].expand(-1, -1, n, -1)
    if sc.window is not None:
        query_index = lo + torch.arange(n)
        seen = seen & (index[:, :, None, :] > (query_index - sc.window)[:, None])
    allowed = torch.cat([seen, new_mask.expand(-1, sc.kv_heads, -1, -1)], -1).repeat_interleave(sc.group, 1)
    keys = torch.cat([keys_past, k.float()], 2).repeat_interleave(sc.group, 1)
    values = torch.cat([values_past, v.float()], 2).repeat_interleave(sc.group, 1)
    scores = (q.float() @ keys.transpose(-1, -2)) * d**-0.5
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return weights @ values  # (B, heads, n, d)


def _drive(sc: Scenario, check_formula: bool = True) -> None:
    """Feed ``sc.sizes`` through a fresh layer and check every documented invariant after each update."""
    note(repr(sc))
    layer, aqua = _build_layer(sc)
    policy = sc.token
    budget = capped_budget(policy.budget if policy is not None else None, sc.window)
    gen = torch.Generator().manual_seed(sc.seed)
    total = sum(sc.sizes)
    B, H, D = sc.batch, sc.kv_heads, sc.head_dim
    k_hist = torch.randn(B, H, total, D, generator=gen).to(sc.dtype)
    v_hist = torch.randn(B, H, total, D, generator=gen).to(sc.dtype)
    pads = torch.tensor(sc.pads)
    key_dim = aqua.key_dim(sc.layer_idx) if aqua is not None else D
    exact_rows = (aqua.exact_sinks + aqua.exact_recent) if aqua is not None and key_dim < D else 0
    stored_hist = aqua.project_keys(sc.layer_idx, k_hist) if aqua is not None else k_hist
    residual_hist = aqua.residual_keys(sc.layer_idx, k_hist) if exact_rows else None
    ordered = True  # slots are in token order until a full decode buffer is overwritten in place
    lo = 0
    for step, n in enumerate(sc.sizes):
        hi = lo + n
        k, v = k_hist[:, :, lo:hi], v_hist[:, :, lo:hi]
        q = torch.randn(B, H * sc.group, n, D, generator=gen).to(sc.dtype)
        pad_new = torch.arange(lo, hi)[None, :] < pads[:, None]  # (B, n)
        new_mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & ~pad_new[:, None, None, :]
        store = layer.slots
        if budget is not None and n == 1 and layer.is_initialized and store.used == store.capacity == budget + 1:
            ordered = False
        layer.update(k, v)
        seen = hi
        inputs = layer._pending
        index = store.index[..., :inputs.past_keys.shape[-2]].clone()
        capacity = layer.keys.shape[-2]
        note(f"step {step}: n={n} seen={seen} capacity={capacity} past={inputs.past_keys.shape[-2]}")

        # positions: tokens seen grow by exactly n
        assert layer.get_seq_length() == seen
        # held <= budget + n while the chunk is attended (budget + 1 while decoding)
        if budget is None:
            assert capacity == seen
        else:
            assert int(inputs.past_visible.sum(-1).max()) <= budget
            assert capacity <= budget + n
        assert capacity <= seen + max(GROWTH_MIN, seen // GROWTH_DIVISOR)  # never more than one growth step

        out, _ = dispatch.compressed_attention(_AttentionModule(sc.layer_idx), q, None, None, new_mask)
        if sc.dtype == torch.float32:
            want = _oracle_attention(sc, layer, aqua, inputs, index, q, k, v, new_mask, k_hist, v_hist, lo)
            assert (out - want.transpose(1, 2)).abs().max().item() < TOL

        layer.finalize()
        _check_held(sc, layer, budget, seen, ordered, stored_hist, v_hist, residual_hist, pads)
        _check_bytes(sc, layer, aqua, key_dim, exact_rows, budget, seen, step, check_formula)
        lo = hi


def _check_held(sc, layer, budget, seen, ordered, stored_hist, v_hist, residual_hist, pads) -> None:
    """After an update was attended and folded: counts, positions, contents, protected and exact tokens."""
    store, B, H = layer.slots, sc.batch, sc.kv_heads
    capacity = store.capacity
    valid, index = store.valid, store.index.long()
    held = valid.sum(-1)  # (B, H)
    assert torch.equal(layer.left_pad[:, 0, 0], torch.minimum(pads, torch.tensor(seen)).int())
    if budget is not None:
        assert capacity <= budget + 1
        assert int(held.max()) <= budget + 1
    # never fewer than the budget allows: the attendable real tokens, or the budget
    attendable = torch.arange(seen)[None, :] >= pads[:, None]  # (B, seen) real tokens
    if sc.window is not None:
        attendable &= torch.arange(seen)[None, :] > seen - sc.window
    in_window = valid & ((index > seen - sc.window) if sc.window is not None else True)
    floor = attendable.sum(-1) if budget is None else attendable.sum(-1).clamp_max(budget)
    assert (in_window.sum(-1) >= floor[:, None]).all()
    # held tokens are real, seen, unique, and hold their own key and value
    assert (index[valid] < seen).all()
    assert (index >= pads[:, None, None])[valid].all()
    marks = torch.zeros(B, H, seen + 1, dtype=torch.int64)
    marks.scatter_add_(2, index.where(valid, seen), valid.long())
    assert int(marks.amax()) <= 1  # the last column only collects empty slots (adds 0)
    assert _close(store.keys[valid], _gather(stored_hist, index)[valid], sc.dtype)
    assert torch.equal(store.values[valid], _gather(v_hist, index)[valid])
    if ordered:  # appended and evicted in order: slot order is token order
        used = index[..., :store.used]
        assert (used[..., 1:] > used[..., :-1]).all()
    # the tokens a policy pins are held (unless the model's own window already dropped them)
    policy = sc.token
    if policy is not None and (sc.window is None or policy.budget <= sc.window - 1):
        position = torch.arange(seen)[None, :] - pads[:, None]  # (B, seen), negative for padding
        newest = policy.window if isinstance(policy, SlidingWindow) else policy.recent
        pinned = (position >= 0) & ((position < policy.sinks) | (torch.arange(seen)[None, :] >= seen - newest))
        if sc.window is not None:
            pinned &= torch.arange(seen)[None, :] > seen - sc.window
        is_held = marks[..., :seen] > 0  # (B, H, seen)
        assert (is_held | ~pinned[:, None, :]).all()
        if isinstance(policy, SlidingWindow):  # beyond the sinks, exactly the newest tokens: a suffix
            rest = is_held & (position >= policy.sinks)[:, None, :]
            count = rest.sum(-1, keepdim=True)
            assert torch.equal(rest, torch.arange(seen) >= seen - count)
    if residual_hist is not None:
        _check_exact(sc, layer, seen, index, valid, residual_hist, pads)


def _check_exact(sc, layer, seen, index, valid, residual_hist, pads) -> None:
    """AQUA's exact rows: each points at a held token, its own row, with its dropped channels; the
    first real tokens and the latest ones are covered."""
    rows, sinks, recent = layer.exact, layer.exact.sinks, layer.exact.recent
    slot = rows.slot  # (B, H, E)
    points = slot >= 0
    assert (rows.keys[~points] == 0).all()
    token = index.gather(2, slot.clamp_min(0))  # (B, H, E) token of each row
    assert valid.gather(2, slot.clamp_min(0))[points].all()
    row = torch.arange(sinks + recent)
    position = token - pads[:, None, None]
    right_row = torch.where(row < sinks, position == row, (token % max(recent, 1)) == row - sinks)
    assert right_row[points].all()
    assert _close(rows.keys[points], _gather(residual_hist, token)[points], sc.dtype)
    dup = torch.zeros(*slot.shape[:2], layer.slots.capacity + 1, dtype=torch.int64)
    dup.scatter_add_(2, slot.where(points, layer.slots.capacity), torch.ones_like(slot))
    assert int(dup[..., :-1].amax()) <= 1  # no token counted twice
    # coverage: every held first real token and every held latest non-sink token has its row
    covered = torch.zeros(*slot.shape[:2], layer.slots.capacity + 1, dtype=torch.bool)
    covered.scatter_(2, slot.where(points, layer.slots.capacity), True)
    covered = covered[..., :-1]
    pos = index - pads[:, None, None]
    should = valid & (pos >= 0) & ((pos < sinks) | ((index >= seen - recent) & (pos >= sinks)))
    assert (covered | ~should).all()


def _check_bytes(sc, layer, aqua, key_dim, exact_rows, budget, seen, step, check_formula) -> None:
    """``nbytes()`` is the sum of the held tensors (each owning its storage) and the accounting formula."""
    store, exact = layer.slots, layer.exact
    tensors = [store.keys, store.values, store.index, store.valid, layer.left_pad]
    policy = sc.token
    if policy is not None and policy.needs_scores:
        tensors.append(store.score)
    else:
        assert store.score is None
    if exact_rows:
        tensors += [exact.keys, exact.slot]
    else:
        assert exact is None
    for t in tensors:
        assert t.untyped_storage().nbytes() == t.nbytes  # no view into a larger buffer
    assert layer.nbytes() == sum(t.nbytes for t in tensors)
    elem = torch.finfo(sc.dtype).bits // 8
    needs_scores = bool(policy is not None and policy.needs_scores)

    def formula(slots: int) -> int:
        return layer_nbytes(sc.batch, sc.kv_heads, slots, key_dim, sc.head_dim, elem, compressed=True,
                            needs_scores=needs_scores, exact_tokens=exact_rows, residual_dim=sc.head_dim - key_dim)

    assert layer.nbytes() == formula(store.capacity)
    if sc.uniform and check_formula:  # the planner's prediction of the slots, from the schedule alone
        if seen <= sc.prompt:
            slots = prefill_slots(budget, seen, sc.chunk)
        else:
            slots = decode_slots(policy.budget if policy else None, seen, sc.window, prompt=sc.prompt, chunk=sc.chunk)
        assert layer.nbytes() == formula(slots), f"{store.capacity} slots held, {slots} predicted"


def _padding_alone_with_exact_ring(sc: Scenario) -> bool:
    """Whether a 1-token update holds a padding token of some row while AQUA keeps a ring of exact rows
    (the case of test_padding_token_alone_with_exact_ring below)."""
    layer, _ = _build_layer(sc)
    if layer.exact is None or layer.exact.recent == 0:
        return False
    lo = 0
    for n in sc.sizes:
        if n == 1 and lo < max(sc.pads):
            return True
        lo += n
    return False


@examples(500)
@given(sc=scenarios())
def test_layer_invariants(sc):
    """Held <= budget (+ chunk), positions, contents, protected and exact tokens, attention, bytes."""
    _drive(sc)


@examples(20, phases=[Phase.explicit, Phase.generate])
@given(sc=scenarios(uniform=True, single_token_tail=True).filter(
    lambda sc: sc.token is not None and capped_budget(sc.token.budget, sc.window) > sc.prompt))
def test_slot_formula_with_single_token_prompt_chunk(sc):
    """A budgeted layer takes a prompt's 1-token chunk as a decode step (its growing buffer): the formula says so.

    Was a bug: prefill_slots/decode_slots appended every prompt chunk, e.g. SlidingWindow(sinks=0,
    window=2) on a 1-token prompt holds 3 slots where they said 1, H2O(heavy=10, recent=10) on
    prompt 5 chunk 4 holds 20 where they said 5.
    """
    _drive(sc)


@examples(10, phases=[Phase.explicit, Phase.generate])
@given(sc=scenarios(lone_padding=True).filter(_padding_alone_with_exact_ring))
def test_padding_token_alone_with_exact_ring(sc):
    """A 1-token update of a padding token under AQUA's exact ring stores no exact row for it.

    Was a crash: ExactRows.store_one took the padding token (position before - left_pad = -1) for a
    sink and scattered at row -1 ('index -1 is out of bounds'), e.g. CompressedCache(model,
    Aqua(k_ratio=0.5, basis='identity'), prefill_chunk=1).prefill(left-padded ids, mask).
    """
    _drive(sc)

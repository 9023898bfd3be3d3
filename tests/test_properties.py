"""Property tests (hypothesis): the cache's invariants over random shapes x policies x batch x padding x chunking.

Two levels:

- **tensor level**: one :class:`~kvpress_aqua.core.layer.CompressedLayer` driven through its ``update()``
  contract with random post-RoPE keys, values and queries (the attention call that follows is
  :func:`~kvpress_aqua.attention.dispatch.compressed_attention`, as in a model), over random KV heads,
  GQA groups, head widths, dtypes, the model's own sliding window, left padding and any sequence
  of chunk sizes. After every update it checks what the docs promise (docs/cache.md, the policies'
  docstrings): held <= budget + n while a chunk of n is attended and <= budget + 1 after it, never
  fewer than the budget allows, held tokens are real, unique and at their original positions, the
  protected tokens (sinks, recent, a sliding window) are held, AQUA's exact rows point at the
  right tokens, the attention equals plain attention over exactly the held tokens, and ``nbytes()``
  is the sum of the held tensors and the byte formula of ``core/accounting.py``.
- **model level**: the tiny random-weight decoders of ``tests/tiny_models.py``: a cache that evicts
  nothing gives ``DynamicCache``'s logits (chunked, padded, batched, AQUA with every held token
  exact), and each row of a left-padded batch gives the logits (and holds the tokens) of that row
  run alone, under evicting policies.

Examples are derandomized (the same ones on every run, CI reproducible) and sized to run in
about a minute on one core. ``KVPRESS_HYPOTHESIS=thorough`` runs 10x the examples with fresh
randomness (``KVPRESS_HYPOTHESIS_SCALE`` sets another factor).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, Phase, assume, event, given, note, settings
from hypothesis import strategies as st
from tiny_models import byte_tokenizer, make_tiny_model
from transformers import DynamicCache

from kvpress_aqua import CompressedCache, ModelInfo
from kvpress_aqua.artifacts.aqua import AquaArtifact
from kvpress_aqua.attention import dispatch
from kvpress_aqua.calibration import calibrate
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
from kvpress_aqua.util.compat import cache_kwargs

settings.register_profile(
    "kvpress-ci",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("kvpress-thorough", parent=settings.get_profile("kvpress-ci"), derandomize=False)
_PROFILE = settings.get_profile(f"kvpress-{os.environ.get('KVPRESS_HYPOTHESIS', 'ci')}")
_SCALE = float(os.environ.get("KVPRESS_HYPOTHESIS_SCALE", 10 if os.environ.get("KVPRESS_HYPOTHESIS") == "thorough"
                              else 1))


def examples(n: int, **kw) -> settings:
    """The file's profile with ``n`` examples (times ``KVPRESS_HYPOTHESIS_SCALE``)."""
    return settings(_PROFILE, max_examples=max(1, round(n * _SCALE)), **kw)


TOL = 1e-4

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


# ------------------------------------------------------------------------------- model level
MODELS = [("llama", None), ("qwen3", None), ("mistral", 6), ("phi3", None), ("gemma", None)]
"""Tiny random-weight decoders (``tests/tiny_models.py``); mistral with its own sliding window of 6."""
TEXT = "A lighthouse keeper counts the ships that pass the harbour each night and logs the weather. " * 10


@functools.cache
def _model(arch: str, window: int | None):
    return make_tiny_model(arch, **({"sliding_window": window} if window else {}))


@functools.cache
def _artifact(arch: str, window: int | None) -> AquaArtifact:
    model = _model(arch, window)
    return calibrate(model, byte_tokenizer(model.config.vocab_size), TEXT, tokens=400, chunk=128, progress=False)


@dataclass
class Batch:
    """Left-padded prompts, a prefill chunk, an optional second prefill call, and the decode steps that follow."""

    model: tuple[str, int | None]
    lengths: list[int]
    chunk: int | None
    steps: int
    seed: int
    split: int | None = None
    """The prompt is prefilled in two calls (a context, then a question), split at this column."""

    @property
    def width(self) -> int:
        return max(self.lengths)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        ids = torch.zeros(len(self.lengths), self.width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(self.lengths):
            ids[i, self.width - n:] = torch.randint(3, 128, (n,), generator=gen)
            mask[i, self.width - n:] = 1
        return ids, mask

    def bounds(self) -> list[tuple[int, int]]:
        """The ``[lo, hi)`` columns of each forward of the prompt (``prefill`` chunks each call from its start)."""
        calls = [(0, self.width)] if self.split is None else [(0, self.split), (self.split, self.width)]
        return [(lo, min(lo + (self.chunk or b - a), b)) for a, b in calls for lo in range(a, b, self.chunk or b - a)]


@st.composite
def batches(draw, rows: tuple[int, int] = (1, 3), max_len: int = 14) -> Batch:
    lengths = draw(st.lists(st.integers(1, max_len), min_size=rows[0], max_size=rows[1]))
    width = max(lengths)
    split = draw(st.none() | st.integers(1, width - 1)) if width > 1 else None
    return Batch(model=draw(st.sampled_from(MODELS)), lengths=lengths, chunk=draw(st.none() | st.integers(1, 8)),
                 steps=draw(st.integers(1, 5)), seed=draw(st.integers(0, 2**16)), split=split)


def _aqua(knobs: dict | None, batch: Batch) -> list:
    return [] if knobs is None else [Aqua(**knobs, artifact=_artifact(*batch.model))]


def _decode(model, cache, logits, mask, steps, forced=None, check_positions=False):
    """Greedy (or ``forced``) decode steps of a left-padded batch; returns every step's logits ``(B, 1 + steps, V)``."""
    out, full, position = [logits], mask, mask.sum(-1)
    for step in range(steps):
        token = out[-1].argmax(-1) if forced is None else forced[:, step]
        if check_positions:  # the next position of each row: its real tokens so far, step by step
            assert torch.equal(cache.real_tokens_seen(), position)
        full = torch.cat([full, full.new_ones(full.shape[0], 1)], 1)
        logits = model(token[:, None], attention_mask=full, position_ids=position[:, None],
                       **cache_kwargs(model, cache)).logits[:, -1]
        out.append(logits)
        position = position + 1
    return torch.stack(out, 1)


def _dense_run(model, ids, mask, steps):
    cache = DynamicCache()
    with torch.no_grad():
        position = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(ids, attention_mask=mask, position_ids=position, **cache_kwargs(model, cache)).logits[:, -1]
        return _decode(model, cache, logits, mask, steps)


def _watch_held(cache: CompressedCache) -> None:
    """Check at every layer update: only the layer being fed holds more than its budget + 1, and at most
    budget + n for a chunk of n (a prompt fed in one forward is held in full by one layer at a time)."""
    update, info, token = cache.update, cache.info, cache.token_policy
    budgets = [capped_budget(token.budget if token else None, info.sliding_window if info.is_sliding(i) else None)
               for i in range(info.num_layers)]

    def watched(keys, values, layer_idx, *args, **kwargs):
        out = update(keys, values, layer_idx, *args, **kwargs)
        n = keys.shape[-2]
        for i, layer in enumerate(cache.layers):
            if budgets[i] is not None and layer.is_initialized:
                assert layer.keys.shape[-2] <= budgets[i] + (n if i == layer_idx else 1), (i, layer_idx, n)
        return out

    cache.update = watched


def _compressed_run(model, cache, batch, ids, mask, forced, check_positions=True):
    if cache.policies:
        _watch_held(cache)
    with torch.no_grad():
        if batch.split is None:
            logits = cache.prefill(ids, mask)
        else:
            cache.prefill(ids[:, :batch.split], mask[:, :batch.split])
            if check_positions:
                assert torch.equal(cache.real_tokens_seen(), mask[:, :batch.split].sum(-1))
            logits = cache.prefill(ids[:, batch.split:], mask[:, batch.split:])
        return _decode(model, cache, logits, mask, batch.steps, forced, check_positions=check_positions)


def _check_cache_bytes(cache: CompressedCache, batch: Batch) -> None:
    """The whole cache: ``nbytes()`` is the layers' tensors plus AQUA's matrices, and the planner's formula."""
    info, aqua = cache.info, cache.channel_policy
    rows, width = len(batch.lengths), batch.width
    seen = width + batch.steps
    assert cache.get_seq_length() == seen
    token = cache.token_policy
    total = 0
    for i, layer in enumerate(cache.layers):
        window = info.sliding_window if info.is_sliding(i) else None
        key_dim = aqua.key_dim(i) if aqua is not None else info.head_dim
        exact = aqua.exact_sinks + aqua.exact_recent if aqua is not None and key_dim < info.head_dim else 0
        if batch.split is not None:
            # two prefill calls: not the planner's schedule. The bytes still follow the slots held.
            slots = layer.keys.shape[-2]
        else:
            slots = decode_slots(token.budget if token else None, seen, window, prompt=width, chunk=batch.chunk)
        assert layer.keys.shape[-2] == slots
        total += layer_nbytes(rows, info.num_kv_heads, slots, key_dim, info.head_dim, 4, compressed=True,
                              needs_scores=bool(token and token.needs_scores), exact_tokens=exact,
                              residual_dim=info.head_dim - key_dim)
    if aqua is not None:
        keeps_exact = aqua.exact_sinks + aqua.exact_recent > 0
        total += sum(info.num_kv_heads * info.head_dim * (info.head_dim if keeps_exact else aqua.key_dim(i)) * 4
                     for i in range(info.num_layers))
    assert cache.nbytes() == total


@st.composite
def lossless(draw, batch: Batch) -> list:
    """Policies that, on this batch, evict nothing and keep every stored key exact."""
    big = batch.width + batch.steps
    token = draw(st.sampled_from(["none", "sliding", "h2o", "tova"]))
    sinks = draw(st.integers(0, 3))
    if batch.model[1] is not None:
        sinks = min(sinks, batch.model[1] - 1)
    extra = draw(st.integers(0, 4))
    policies = {
        "none": [],
        "sliding": [SlidingWindow(sinks=sinks, window=big - sinks + extra)] if big > sinks else [],
        "h2o": [H2O(heavy=big + extra, recent=draw(st.integers(0, 3)), sinks=sinks)],
        "tova": [TOVA(heavy=big + extra, recent=draw(st.integers(0, 3)), sinks=sinks)],
    }[token]
    channel = draw(st.sampled_from(["none", "full", "exact"]))
    if channel == "full":  # every channel kept, in a calibrated or trivial basis
        policies += _aqua({"k_ratio": 1.0, "basis": draw(st.sampled_from(["svd", "identity", "think"])),
                           "exact_recent": draw(st.integers(0, 3))}, batch)
    elif channel == "exact":  # channels pruned, but every token is among the exact ones
        policies += _aqua({"k_ratio": draw(st.sampled_from([0.25, 0.5])),
                           "basis": draw(st.sampled_from(["svd", "identity", "think"])),
                           "per_layer": draw(st.sampled_from(["uniform", "spectrum"])),
                           "exact_sinks": draw(st.integers(0, 3)), "exact_recent": big + extra}, batch)
    return policies


@examples(150)
@given(data=st.data(), batch=batches())
def test_no_eviction_equals_dynamic_cache(data, batch):
    """A cache that evicts nothing (any chunking, padding, batch) gives DynamicCache's logits, step by step."""
    policies = data.draw(lossless(batch), label="policies")
    model = _model(*batch.model)
    ids, mask = batch.tensors()
    want = _dense_run(model, ids, mask, batch.steps)
    cache = CompressedCache(model, *policies, prefill_chunk=batch.chunk)
    try:
        got = _compressed_run(model, cache, batch, ids, mask, forced=want[:, :-1].argmax(-1))
    finally:
        cache.detach()
    assert (got - want).abs().max().item() < TOL
    if policies:
        _check_cache_bytes(cache, batch)
    else:
        assert cache.nbytes() == cache.dense_nbytes()


_EVICTING = st.one_of(
    st.builds(SlidingWindow, sinks=st.integers(0, 2), window=st.integers(1, 6)),
    st.tuples(st.integers(0, 6), st.integers(0, 4), st.integers(0, 2)).filter(lambda t: sum(t) > 0).flatmap(
        lambda t: st.sampled_from([H2O(*t), TOVA(*t)])),
)
_LOSSY_AQUA = st.fixed_dictionaries({
    "k_ratio": st.sampled_from([0.5, 0.75, 1.0]),
    "q_ratio": st.sampled_from([1.0, 0.5]),
    "basis": st.sampled_from(["svd", "identity", "think"]),
    "per_layer": st.sampled_from(["uniform", "spectrum"]),
    "exact_sinks": st.integers(0, 2),
    "exact_recent": st.integers(0, 4),
})


def _single_run(model, policies, row, pad, batch, forced):
    """One row alone, unpadded, its prompt fed in the pieces the padded batch's forwards hold of it."""
    cache = CompressedCache(model, *policies)
    with torch.no_grad():
        for lo, hi in batch.bounds():
            a, b = max(lo, pad) - pad, hi - pad
            if b > a:
                logits = model(row[None, a:b], **cache_kwargs(model, cache)).logits[:, -1]
        out = [logits]
        for token in forced:
            out.append(model(token.view(1, 1), **cache_kwargs(model, cache)).logits[:, -1])
    cache.detach()
    return torch.stack(out, 1)[0], cache


def _held(cache: CompressedCache, row: int) -> list[set]:
    """Per layer and KV head, the positions (among the row's real tokens) of the tokens held."""
    cache.finalize()
    held = []
    for layer in cache.layers:
        position = layer.index[row] - layer.left_pad[row, 0]
        held.append([frozenset(position[h][layer.valid[row, h]].tolist()) for h in range(layer.num_kv_heads)])
    return held


@examples(100)
@given(batch=batches(rows=(2, 3), max_len=18), token=st.one_of(_EVICTING, _EVICTING, _EVICTING, st.none()),
       aqua=st.none() | _LOSSY_AQUA)
def test_padded_batch_rows_equal_single_rows(batch, token, aqua):
    """Each row of a left-padded, chunked batch gives the logits and holds the tokens of that row run alone."""
    assume(token is not None or aqua is not None)
    if batch.model[1] is not None and token is not None:
        assume(token.sinks <= batch.model[1] - 1)
    model = _model(*batch.model)

    def policies():
        return [p for p in (token,) if p is not None] + _aqua(aqua, batch)

    ids, mask = batch.tensors()
    cache = CompressedCache(model, *policies(), prefill_chunk=batch.chunk)
    try:
        got = _compressed_run(model, cache, batch, ids, mask, forced=None)
    finally:
        cache.detach()
    forced = got[:, :-1].argmax(-1)
    width = batch.width
    _check_cache_bytes(cache, batch)
    for i, n in enumerate(batch.lengths):
        alone, single = _single_run(model, policies(), ids[i, width - n:], width - n, batch, forced[i])
        assert (got[i] - alone).abs().max().item() < TOL, f"row {i}"
        assert _held(cache, i) == _held(single, 0), f"row {i}"
    real = torch.tensor(batch.lengths)[:, None] + batch.steps
    evicted = any(bool((layer.valid.sum(-1) < real).any()) for layer in cache.layers)
    event("evicted" if evicted else "nothing evicted")


@examples(10, phases=[Phase.explicit, Phase.generate])
@given(batch=batches(rows=(2, 3)).filter(lambda b: b.split is not None and min(b.lengths) < b.width))
def test_plain_cache_with_padding_prefilled_in_two_calls(batch):
    """A plain cache (no policy) prefilled as context then question keeps the left padding of the first call.

    Was a bug: real_tokens_seen counted the padding and prefill marked every earlier token attendable, so
    the question got positions shifted by the padding and attended it (logits off by ~0.2).
    """
    model = _model(*batch.model)
    ids, mask = batch.tensors()
    want = _dense_run(model, ids, mask, batch.steps)
    cache = CompressedCache(model, prefill_chunk=batch.chunk)
    got = _compressed_run(model, cache, batch, ids, mask, forced=want[:, :-1].argmax(-1))
    assert (got - want).abs().max().item() < TOL

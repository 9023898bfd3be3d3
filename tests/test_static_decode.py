"""Static decoding: the same tokens as the growing cache, one traced graph for every step, nothing reallocated."""

import pytest
import torch
from tiny_models import byte_tokenizer, make_tiny_model

from kvpress_aqua import CompressedCache
from kvpress_aqua.calibration.calibrate import calibrate
from kvpress_aqua.evaluation.static_decode import compiled_step, generate_static
from kvpress_aqua.policies import H2O, TOVA, Aqua, Retrieval, SlidingWindow
from kvpress_aqua.util.compat import cache_kwargs

STEPS = 10


def _regular(model, cache, ids, mask):
    """Greedy decoding through the growing (non-static) cache, at each row's real positions."""
    with torch.no_grad():
        logits = cache.prefill(ids, mask)
        tokens = [logits.argmax(-1, keepdim=True)]
        grown = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        for _ in range(STEPS - 1):
            positions = cache.real_tokens_seen()[:, None]
            logits = model(tokens[-1], attention_mask=grown, position_ids=positions,
                           **cache_kwargs(model, cache)).logits[:, -1]
            tokens.append(logits.argmax(-1, keepdim=True))
            grown = torch.cat([grown, grown.new_ones(grown.shape[0], 1)], 1)
    return torch.cat(tokens, 1)


def _aqua(model):
    artifact = calibrate(model, byte_tokenizer(model.config.vocab_size), "The quick brown fox jumps. " * 40,
                         tokens=300, chunk=100, progress=False)
    return Aqua(k_ratio=0.5, artifact=artifact, exact_sinks=2, exact_recent=3)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("make", [lambda m: (H2O(heavy=8, recent=4, sinks=1),), lambda m: (SlidingWindow(2, 10),),
                                  lambda m: (TOVA(heavy=8, recent=4),), lambda m: (H2O(heavy=8, recent=4), _aqua(m)),
                                  lambda m: (_aqua(m),),
                                  lambda m: (Retrieval(top_k=4, recent=4, sinks=1, proxy="lrqk", rank=4,
                                                       offload=None),),
                                  lambda m: (Retrieval(top_k=5, recent=3, sinks=2, proxy="lrqk", rank=8,
                                                       proxy_dtype="int8"),),
                                  lambda m: (Retrieval(top_k=4, recent=4, sinks=1, proxy="lrqk", rank=4), _aqua(m))],
                         ids=["h2o", "sliding", "tova", "h2o-aqua", "aqua", "retrieval-resident", "retrieval-int8",
                              "retrieval-aqua"])
def test_static_decoding_gives_the_same_tokens(arch, make):
    model = make_tiny_model(arch)
    policies = make(model)
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # a left-padded row
    want = _regular(model, CompressedCache(model, *policies, prefill_chunk=8), ids, mask)
    cache = CompressedCache(model, *policies, prefill_chunk=8)
    got = generate_static(model, cache, ids, STEPS, attention_mask=mask)
    assert torch.equal(got, want)
    sizes = {layer.keys.shape[-2] for layer in cache.layers}
    budget = policies[0].budget if hasattr(policies[0], "budget") else None
    assert sizes == ({min(budget + 1, 30 + STEPS - 1)} if budget else {30 + STEPS - 1})


def test_the_compiled_step_is_one_graph_for_every_step():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    step = compiled_step(mode=None, backend="eager")  # dynamo's capture; CUDA graphs need a GPU (tests/test_gpu.py)
    want = generate_static(model, CompressedCache(model, H2O(heavy=6, recent=3), prefill_chunk=8), ids, STEPS)
    got = generate_static(model, CompressedCache(model, H2O(heavy=6, recent=3), prefill_chunk=8), ids, STEPS,
                          step=step)
    assert torch.equal(got, want)
    assert counters["stats"]["unique_graphs"] == 1  # no recompile from one step to the next
    assert not counters["graph_break"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter on CPU tensors; tests/test_gpu.py compiles "
                    "the kernel on CUDA")
def test_the_compiled_step_keeps_the_fused_kernel_whole(monkeypatch):
    """With the Triton kernel (interpreted on CPU) the step is still one graph: the kernel is one custom op."""
    pytest.importorskip("triton")
    from kvpress_aqua.attention import dispatch

    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(4))
    want = generate_static(model, CompressedCache(model, TOVA(heavy=6, recent=3), prefill_chunk=8), ids, 6)
    monkeypatch.setattr(dispatch, "BACKEND", "triton")
    got = generate_static(model, CompressedCache(model, TOVA(heavy=6, recent=3), prefill_chunk=8), ids, 6,
                          step=compiled_step(mode=None, backend="eager"))
    assert torch.equal(got, want)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_a_static_cache_keeps_its_tensors_in_place():
    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    cache = CompressedCache(model, H2O(heavy=6, recent=3))
    with torch.no_grad():
        cache.prefill(ids)
    cache.make_static(5)
    before = {name: t.data_ptr() for layer in cache.layers for name, t in layer._tensors().items()}
    with torch.no_grad():
        model(ids[:, :1], position_ids=torch.tensor([[20]]), attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool),
              **cache_kwargs(model, cache))
    after = {name: t.data_ptr() for layer in cache.layers for name, t in layer._tensors().items()}
    assert before == after
    assert cache.get_seq_length() == 21


def test_make_static_marks_every_tensor_a_step_reads_as_keeping_its_address():
    """A CUDA graph copies an unmarked input into its own buffer at every replay (AQUA's bases, once per layer)."""
    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(3))
    aqua = _aqua(model)
    cache = CompressedCache(model, H2O(heavy=6, recent=3), aqua)
    with torch.no_grad():
        cache.prefill(ids)
    assert not any(hasattr(t, "_dynamo_static_input_type") for t in aqua.tensors())
    cache.make_static(5)
    tensors = [*aqua.tensors(), *(t for layer in cache.layers for t in layer.slots.tensors().values())]
    assert all(getattr(t, "_dynamo_static_input_type", None) is not None for t in tensors)


def test_make_static_needs_a_prompt_and_one_token_per_step():
    model = make_tiny_model("llama")
    cache = CompressedCache(model, H2O(heavy=6, recent=3))
    with pytest.raises(ValueError, match="prefill"):
        cache.make_static(4)
    with torch.no_grad():
        cache.prefill(torch.randint(3, 128, (1, 12)))
    cache.make_static(4)
    with pytest.raises(ValueError, match="one token per step"), torch.no_grad():
        model(torch.randint(3, 128, (1, 3)), **cache_kwargs(model, cache))


@pytest.mark.parametrize("policies", [(SlidingWindow(4, 200),), (TOVA(heavy=100, recent=100, sinks=4),),
                                      (SlidingWindow(4, 200), Aqua(k_ratio=0.5, basis="identity"))],
                         ids=["sliding", "tova", "sliding-aqua"])
def test_inductor_writes_the_held_buffers_in_place(policies):
    """The compiled step loops over no whole held key or value buffer: each step writes one slot of it, in place.

    A whole-buffer loop is a copy of the buffer (a full read and write of the layer's cache at every
    step); the store's ``scatter_`` made inductor emit one per buffer per layer.
    """
    import re

    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = make_tiny_model("llama")
    ids = torch.randint(3, 128, (2, 300), generator=torch.Generator().manual_seed(5))
    cache = CompressedCache(model, *policies, prefill_chunk=128)
    step = compiled_step(mode=None)  # inductor, C++ code on the CPU
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cache hit would generate no code to read
        _, code = run_and_get_code(lambda: generate_static(model, cache, ids, 3, step=step))
    assert code
    store = cache.layers[0].slots
    for buffer in (store.keys, store.values):
        assert not re.search(rf"<\s*static_cast<int64_t>\({buffer.numel()}L\)", "\n".join(code)), buffer.shape

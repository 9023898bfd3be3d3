"""GPU correctness: exactness and byte accounting on CUDA. Skipped cleanly without a GPU."""

import pytest
import torch
from tiny_models import make_tiny_model
from torch._dynamo.utils import counters
from transformers import DynamicCache

from kvpress_aqua import CompressedCache
from kvpress_aqua.policies import H2O, TOVA, Retrieval, SlidingWindow
from kvpress_aqua.policies.aqua import Aqua
from kvpress_aqua.util.compat import cache_kwargs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _generate(model, ids, cache, steps=6):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             **cache_kwargs(model, cache),
                             output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits, 1), out.sequences


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma"])
@pytest.mark.parametrize(
    "policies",
    [(H2O(heavy=64, recent=8),), (SlidingWindow(4, 60), Aqua(k_ratio=1.0, basis="identity")),
     (H2O(heavy=64, recent=8), Aqua(k_ratio=0.5, basis="identity", exact_recent=128))],
    ids=["h2o", "sliding-aqua1", "h2o-aqua-exact"],
)
def test_cuda_no_eviction_equals_dynamic_cache(arch, policies):
    model = make_tiny_model(arch).cuda()
    ids = torch.randint(3, 128, (2, 17), generator=torch.Generator().manual_seed(1)).cuda()
    ref, ref_seq = _generate(model, ids, DynamicCache())
    cache = CompressedCache(model, *policies)
    got, seq = _generate(model, ids, cache)
    assert torch.equal(seq, ref_seq)
    assert (got - ref).abs().max().item() < 1e-4


def test_cuda_bf16_eviction_runs_and_accounts():
    model = make_tiny_model("llama").to("cuda", torch.bfloat16)
    ids = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(2)).cuda()
    torch.cuda.synchronize()
    cache = CompressedCache(model, H2O(heavy=16, recent=8, sinks=2))
    before = torch.cuda.memory_allocated()
    _generate(model, ids, cache, steps=8)
    torch.cuda.synchronize()
    tensors = [t for layer in cache.layers for t in layer._tensors().values()]
    held = sum(t.nbytes for t in tensors)
    assert cache.nbytes() == held
    # the caching allocator rounds every block up to 512 bytes; nothing else of the run stays allocated
    grown = torch.cuda.memory_allocated() - before
    assert held <= grown <= held + 512 * len(tensors)
    assert all(t.is_cuda for t in tensors)


def test_cuda_exact_tokens_follow_evictions():
    """H2O evicting on CUDA, AQUA pruning half the channels with every kept token exact: equals H2O alone."""
    model = make_tiny_model("llama").cuda()
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(3)).cuda()
    policy = H2O(heavy=8, recent=4, sinks=1)
    alone, _ = _generate(model, ids, CompressedCache(model, policy), steps=8)
    both, _ = _generate(model, ids, CompressedCache(model, policy, Aqua(k_ratio=0.5, basis="identity",
                                                                         exact_recent=128)), steps=8)
    assert (alone - both).abs().max().item() < 1e-4


# ------------------------------------------------------------------ the fused kernel and the static decode step
def _logits_with(model, ids, mask, policies, backend, monkeypatch, chunk=8):
    from kvpress_aqua.attention import dispatch

    monkeypatch.setattr(dispatch, "BACKEND", backend)
    cache = CompressedCache(model, *policies, prefill_chunk=chunk)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                             **cache_kwargs(model, cache))
    return torch.stack(out.logits, 1)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "mistral", "phi3"])
@pytest.mark.parametrize(
    "policies",
    [(H2O(heavy=10, recent=4, sinks=1),), (SlidingWindow(2, 12),),
     (H2O(heavy=10, recent=4), Aqua(k_ratio=0.5, basis="identity", exact_sinks=2, exact_recent=3))],
    ids=["h2o", "sliding", "h2o-aqua-exact"],
)
def test_cuda_kernel_path_equals_the_reference(arch, policies, monkeypatch):
    """The same generation through the fused kernel and through the reference: eviction, AQUA, padding, GQA."""
    model = make_tiny_model(arch, **({"sliding_window": 9} if arch == "mistral" else {})).cuda()
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(4)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    reference = _logits_with(model, ids, mask, policies, "reference", monkeypatch)
    fused = _logits_with(model, ids, mask, policies, "auto", monkeypatch)
    assert (fused - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("policies", [
    (H2O(heavy=10, recent=4, sinks=1),), (TOVA(heavy=10, recent=4, sinks=1),),
    (SlidingWindow(sinks=1, window=13), Aqua(k_ratio=0.5, basis="identity", exact_sinks=0, exact_recent=0)),
    (SlidingWindow(sinks=1, window=13), Aqua(k_ratio=0.5, basis="identity", exact_sinks=1, exact_recent=4)),
], ids=["h2o", "tova", "sliding-aqua-mem", "sliding-aqua-exact"])
def test_cuda_compiled_static_decode_with_cuda_graphs_gives_the_same_tokens(policies):
    """The compiled step gives the eager static tokens, and CUDA graphs capture it (no kernel-by-kernel step)."""
    from kvpress_aqua.evaluation.static_decode import compiled_step, generate_static

    torch._dynamo.reset()
    model = make_tiny_model("llama").cuda()
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(5)).cuda()
    want = generate_static(model, CompressedCache(model, *policies, prefill_chunk=16), ids, 12)
    skips = counters["inductor"]["cudagraph_skips"]
    step = compiled_step()  # inductor + CUDA graphs
    got = generate_static(model, CompressedCache(model, *policies, prefill_chunk=16), ids, 12, step=step)
    assert torch.equal(got, want)
    assert counters["inductor"]["cudagraph_skips"] == skips


@pytest.mark.parametrize("offload", ["cpu", None])
def test_cuda_compiled_static_retrieval_reads_the_host_tier_in_a_cuda_graph(offload):
    """The static step reads an offloaded tier through a device view of its pinned memory, inside a CUDA graph."""
    from kvpress_aqua.evaluation.static_decode import compiled_step, generate_static

    model = make_tiny_model("llama").cuda()
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(5)).cuda()
    policy = Retrieval(top_k=6, recent=4, sinks=2, rank=4, offload=offload)
    eager = CompressedCache(model, policy, prefill_chunk=16)
    want = generate_static(model, eager, ids, 12)
    cache = CompressedCache(model, policy, prefill_chunk=16)
    got = generate_static(model, cache, ids, 12, step=compiled_step())
    assert torch.equal(got, want)
    tier = cache.layers[0].tier
    assert tier.keys.is_pinned() == (offload == "cpu") and tier.key_view.is_cuda
    assert tier.key_view.data_ptr() == tier.keys.data_ptr()  # the view reads the host rows themselves
    stats = cache.retrieval_stats()
    assert stats["decode_steps"] == 11 and stats["rows_per_step"] == len(cache.layers) * 2 * 2 * 6


@pytest.mark.parametrize("policy", [H2O(heavy=10, recent=4, sinks=1), Retrieval(top_k=6, recent=4, sinks=2, rank=4)],
                         ids=["h2o", "retrieval-offload"])
def test_cuda_greedy_generate_through_the_compiled_step_gives_the_same_tokens(policy):
    """``kvtool generate --compile``'s loop: a static cache and the compiled step (CUDA graphs), early stop included."""
    from kvpress_aqua.evaluation.generation import greedy_generate
    from kvpress_aqua.evaluation.static_decode import compiled_step

    model = make_tiny_model("llama").cuda()
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(6)).cuda()
    want = greedy_generate(model, CompressedCache(model, policy, prefill_chunk=16), ids, 10, eos=set())
    got = greedy_generate(model, CompressedCache(model, policy, prefill_chunk=16), ids, 10, eos=set(),
                          step=compiled_step())
    assert got.static and torch.equal(got.tokens, want.tokens)


@pytest.mark.parametrize("offload", ["cpu", None])
def test_cuda_retrieval_covering_every_token_equals_dynamic_cache(offload):
    model = make_tiny_model("llama").cuda()
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(5)).cuda()
    ref, ref_seq = _generate(model, ids, DynamicCache(), steps=8)
    cache = CompressedCache(model, Retrieval(top_k=64, recent=4, sinks=2, rank=4, offload=offload), prefill_chunk=16)
    got, seq = _generate(model, ids, cache, steps=8)
    assert torch.equal(seq, ref_seq) and (got - ref).abs().max().item() < 1e-4
    layer = cache.layers[0]
    assert layer.tier.keys.is_pinned() == (offload == "cpu") and layer.tier.proxy.is_cuda
    assert cache.nbytes("host") == (sum(t.keys.nbytes + t.values.nbytes for t in (layer.tier for layer in cache.layers))
                                    if offload else 0)


def test_cuda_offloaded_retrieval_after_a_one_token_prompt_equals_dynamic_cache():
    """A one-token prompt's forward has no earlier tier row: its empty host slice still moves to the device."""
    model = make_tiny_model("llama").cuda()
    ids = torch.randint(3, 128, (1, 1), generator=torch.Generator().manual_seed(7)).cuda()
    ref, ref_seq = _generate(model, ids, DynamicCache(), steps=8)
    got, seq = _generate(model, ids, CompressedCache(model, Retrieval(top_k=32, recent=2, sinks=1, rank=2)), steps=8)
    assert torch.equal(seq, ref_seq) and (got - ref).abs().max().item() < 1e-4


def test_cuda_pinned_zeros_is_pinned_readable_by_the_gpu_and_unlocked_when_freed():
    """Host pages locked by cudaHostRegister: fast copies, a device view over them, freed and locked again."""
    from kvpress_aqua.core.tier import _device_view
    from kvpress_aqua.util.pinned import pinned_zeros

    device = torch.device("cuda", torch.cuda.current_device())  # a tier passes its proxy's device, index included
    for i in range(4):  # each round frees the last one: its pages must be unlocked, or the next lock fails
        host = pinned_zeros((3, 1_000_003), torch.bfloat16)
        assert host.is_pinned()
        host[1] = i + 0.5
        copied = host.to(device, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(copied.cpu(), host)
        view = _device_view(host, device)
        assert view.is_cuda and torch.equal(view.cpu(), host)
        del host, copied, view

"""CompressedCache on the real SmolLM2-135M-Instruct: exactness, batching, memory, prefix reuse."""

import pytest
import torch
from transformers import DynamicCache

from kvpress_aqua import CompressedCache
from kvpress_aqua.policies import H2O, SlidingWindow
from kvpress_aqua.util.compat import cache_kwargs

pytestmark = pytest.mark.slow

FACT = "The secret code of the vault is 4471. "
FILLER = "The museum opens at nine and closes at five; visitors walk through the quiet halls. "


def _chat(tokenizer, text):
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def _run(model, inputs, cache, steps=12):
    with torch.inference_mode():
        out = model.generate(**inputs, **cache_kwargs(model, cache), max_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return torch.stack(out.logits, 1), out.sequences


def test_no_eviction_equals_dynamic_cache(smollm2):
    model, tokenizer = smollm2
    inputs = _chat(tokenizer, FACT + FILLER * 10 + "What is the secret code of the vault?")
    ref, ref_seq = _run(model, inputs, DynamicCache())
    cache = CompressedCache(model, H2O(heavy=1024, recent=64))
    got, seq = _run(model, inputs, cache)
    cache.detach()
    assert torch.equal(seq, ref_seq)
    assert (got - ref).abs().max().item() < 1e-4


# SmolLM2's chat template opens with a 20-token system prompt; with only 4 sinks a sliding window drops
# it and the model answers nonsense ("opens at 12:15pm"), so the sinks cover it here.
@pytest.mark.parametrize("policy", [SlidingWindow(sinks=32, window=96), H2O(heavy=64, recent=60, sinks=4)],
                         ids=["sliding", "h2o"])
def test_eviction_frees_bytes_and_stays_fluent(smollm2, policy):
    model, tokenizer = smollm2
    inputs = _chat(tokenizer, FILLER * 40 + "In one sentence, when does the museum open?")
    prompt = inputs["input_ids"].shape[1]
    assert prompt > 4 * policy.budget
    cache = CompressedCache(model, policy, prefill_chunk=128)
    with torch.inference_mode():
        cache.prefill(inputs["input_ids"][:, :-1])
        assert all(layer.keys.shape[-2] <= policy.budget + 128 for layer in cache.layers)
        out = model.generate(**inputs, **cache_kwargs(model, cache), max_new_tokens=16, do_sample=False)
    cache.detach()
    text = tokenizer.decode(out[0, prompt:], skip_special_tokens=True)
    assert "nine" in text.lower() or "9" in text
    assert cache.nbytes() < 0.3 * cache.dense_nbytes()
    assert all(layer.keys.shape[-2] == policy.budget + 1 for layer in cache.layers)


def test_left_padded_batch_equals_single_rows(smollm2):
    model, tokenizer = smollm2
    prompts = [FACT + FILLER * 6 + "What is the code?", "Name a colour.", FILLER * 3 + "When does it open?"]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    # index-ranked eviction: no score ties that float noise could flip between batched and single runs
    # (H2O's batch-vs-single equality is tested exactly on tiny models in test_cache.py)
    policy = SlidingWindow(sinks=24, window=16)
    got, _ = _run(model, batch, CompressedCache(model, policy), steps=8)
    for i, text in enumerate(texts):
        single = tokenizer([text], return_tensors="pt", add_special_tokens=False)
        ref, _ = _run(model, single, CompressedCache(model, policy), steps=8)
        assert (got[i] - ref[0]).abs().max().item() < 1e-3
    model.set_attn_implementation("sdpa")


def test_context_then_question_reuses_the_prefix(smollm2):
    model, tokenizer = smollm2
    inputs = _chat(tokenizer, FACT + FILLER * 8 + "What is the secret code of the vault?")
    ids = inputs["input_ids"]
    context = ids[:, :-12]
    cache = CompressedCache(model, H2O(heavy=2048, recent=64))
    with torch.inference_mode():
        model(context, **cache_kwargs(model, cache))
        seen = cache.get_seq_length()
        got, _ = _run(model, {"input_ids": ids}, cache, steps=6)
    ref, _ = _run(model, {"input_ids": ids}, DynamicCache(), steps=6)
    cache.detach()
    assert seen == context.shape[1]
    assert (got - ref).abs().max().item() < 1e-4

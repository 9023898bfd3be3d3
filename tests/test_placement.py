"""Per-layer devices: every layer's tensors, and its policy tensors, where its keys first arrive; bytes split by device.

On CPU the second device is ``meta`` (shapes, no data): a layer fed meta keys must make every
tensor of its own on meta, and its AQUA bases and retrieval proxy basis must move there, while
the other layer stays on the CPU. What needs real data on two devices (a forward through a model
split over devices, its reports) runs in :func:`test_a_model_split_over_two_devices_equals_one_device`
on a GPU machine (CUDA and the CPU, or two GPUs).
"""

from dataclasses import dataclass, field

import pytest
import torch
from tiny_models import byte_tokenizer, make_tiny_model

from kvpress_aqua import CompressedCache
from kvpress_aqua.calibration import calibrate
from kvpress_aqua.core.report import MemoryReport, MemoryRow
from kvpress_aqua.policies import H2O, Retrieval
from kvpress_aqua.policies.aqua import Aqua
from kvpress_aqua.util.compat import cache_kwargs

TEXT = "A lighthouse keeper counts the ships that pass the harbour each night and logs the weather. " * 10


@pytest.fixture(scope="module")
def model_and_artifact():
    model = make_tiny_model("llama")
    return model, calibrate(model, byte_tokenizer(model.config.vocab_size), TEXT, tokens=400, chunk=128,
                            progress=False)


def _stacks(artifact):
    return {
        "h2o+aqua": (H2O(heavy=6, recent=2), Aqua(k_ratio=0.5, exact_sinks=1, exact_recent=2, artifact=artifact)),
        "retrieval-aqua+aqua": (Retrieval(top_k=2, recent=2, sinks=1, proxy="aqua", rank=4, offload=None,
                                          artifact=artifact), Aqua(k_ratio=0.5, artifact=artifact)),
    }


def _layer_tensors(layer):
    named = {"keys": layer.keys, "values": layer.values, "index": layer.index, "valid": layer.valid,
             "left_pad": layer.left_pad, "score": layer.score}
    if layer.exact is not None:
        named["exact_keys"] = layer.exact.keys
    if layer.tier is not None:
        named.update(tier_keys=layer.tier.keys, tier_values=layer.tier.values, proxy=layer.tier.proxy,
                     proxy_basis=layer.tier.basis)
    return {name: t for name, t in named.items() if t is not None}


@pytest.mark.parametrize("stack", ["h2o+aqua", "retrieval-aqua+aqua"])
def test_each_layer_binds_its_tensors_to_the_device_of_its_first_update(model_and_artifact, stack):
    model, artifact = model_and_artifact
    cache = CompressedCache(model, *_stacks(artifact)[stack])
    aqua, devices = cache.channel_policy, ("cpu", "meta")
    for layer_idx, device in enumerate(devices):
        keys, values = (torch.randn(1, 2, 5, 16, device=device) for _ in range(2))
        cache.update(keys, values, layer_idx)
    for layer_idx, device in enumerate(devices):
        layer = cache.layers[layer_idx]
        placed = {name: t.device.type for name, t in _layer_tensors(layer).items()}
        assert placed == dict.fromkeys(placed, device), (layer_idx, placed)
        assert aqua.key_basis(layer_idx).device.type == device
        if aqua.exact_sinks + aqua.exact_recent:
            assert aqua.residual_basis(layer_idx).device.type == device
    assert {t.device.type for t in aqua.tensors()} == set(devices)
    if stack.startswith("retrieval"):  # the policy's basis moved to each layer's device: the tier holds that one
        retrieval = cache.token_policy
        assert [t.device.type for t in retrieval.tensors()] == list(devices)
        assert all(cache.layers[i].tier.basis is retrieval.proxy_basis(i) for i in range(len(devices)))
    cache.detach()


@dataclass
class _RecordingAqua(Aqua):
    """Aqua that records when the cache places a layer's bases and when it projects keys."""

    events: list = field(default_factory=list, compare=False)

    def place(self, layer_idx: int, device: torch.device) -> None:
        self.events.append(("place", layer_idx, device.type))
        super().place(layer_idx, device)

    def project_keys(self, layer_idx: int, keys: torch.Tensor) -> torch.Tensor:
        self.events.append(("project", layer_idx, keys.device.type))
        return super().project_keys(layer_idx, keys)


def test_a_layer_is_placed_once_before_its_first_keys_and_again_after_reset(model_and_artifact):
    model, artifact = model_and_artifact
    aqua = _RecordingAqua(k_ratio=0.5, artifact=artifact)
    cache = CompressedCache(model, H2O(heavy=6, recent=2), aqua)
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, **cache_kwargs(model, cache))
        first = [e for e in aqua.events if e[0] == "place"]
        assert first == [("place", 0, "cpu"), ("place", 1, "cpu")]
        for layer_idx in (0, 1):  # the first event of each layer is its placement
            assert next(e for e in aqua.events if e[1] == layer_idx)[0] == "place"
        cache.reset()
        model(ids, **cache_kwargs(model, cache))
    assert [e for e in aqua.events if e[0] == "place"] == first * 2
    cache.detach()


@pytest.mark.parametrize("offload", ["cpu", None])
def test_bytes_by_device_on_one_device_are_every_byte(model_and_artifact, offload):
    model, artifact = model_and_artifact
    cache = CompressedCache(model, Retrieval(top_k=2, recent=2, sinks=1, proxy="aqua", rank=4, offload=offload,
                                             artifact=artifact), Aqua(k_ratio=0.5, artifact=artifact))
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, **cache_kwargs(model, cache))
    report = cache.memory_report()
    assert {r.device for r in report.rows} == {"cpu"}
    assert report.by_device() == {"cpu": cache.nbytes()}
    assert cache.nbytes(device="cpu") == cache.nbytes() and cache.nbytes(device=torch.device("cpu")) == cache.nbytes()
    assert cache.nbytes(device="cuda") == 0 == cache.nbytes("all", device="cuda:0")
    assert cache.nbytes("host", device="cpu") == cache.nbytes("host")
    assert (cache.nbytes("host") > 0) == (offload == "cpu")
    assert cache.nbytes("all", device="cpu") == cache.nbytes("all") == cache.nbytes() + cache.nbytes("host")
    cache.detach()


def test_report_splits_layers_policies_and_the_host_tier_by_device():
    rows = (MemoryRow(0, "compressed", 8, 8, 100, 200, 30, 1000, device="cuda:0"),
            MemoryRow(1, "retrieval", 8, 8, 50, 60, 7, 1000, host_bytes=900, device="cuda:1"),
            MemoryRow(2, "empty", 0, 0, 0, 0, 0, 0))
    report = MemoryReport(rows, 40, 16, (("cuda:0", 25), ("cuda:1", 15)))
    assert report.by_device() == {"cuda:0": 355, "cuda:1": 132}
    assert sum(report.by_device().values()) == report.total
    assert report.by_device("host") == {"cpu": 900}
    assert report.by_device("all") == {"cuda:0": 355, "cuda:1": 132, "cpu": 900}
    assert report.bytes_on("cuda") == report.total and report.bytes_on("cuda:1") == 132
    assert report.bytes_on("cpu") == 0 and report.bytes_on("cpu", "all") == 900
    assert "by device: cuda:0 355 B, cuda:1 132 B" in report.tables()[-1].caption
    with pytest.raises(ValueError, match="use 'device', 'host' or 'all'"):
        report.by_device("gpu")


def _split(model: torch.nn.Module, second: str) -> None:
    """Layer 1, the final norm and the head on ``second``, the rest on cuda:0; each module's inputs follow it."""

    def to_module(module, args, kwargs):
        device = next(module.parameters()).device
        move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        return tuple(move(a) for a in args), {k: (tuple(map(move, v)) if isinstance(v, tuple) else move(v))
                                              for k, v in kwargs.items()}

    model.cuda()
    for module in (model.model.layers[1], model.model.norm, model.lm_head):
        module.to(second)
    for module in (*model.model.layers, model.model.norm, model.lm_head):
        module.register_forward_pre_hook(to_module, with_kwargs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stack", ["h2o+aqua", "retrieval-aqua+aqua"])
def test_a_model_split_over_two_devices_equals_one_device(model_and_artifact, stack):
    reference_model, artifact = model_and_artifact
    second = "cuda:1" if torch.cuda.device_count() > 1 else "cpu"
    model = make_tiny_model("llama")
    _split(model, second)
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name, net, inputs in (("one", reference_model, ids), ("split", model, ids.cuda())):
        cache = CompressedCache(net, *_stacks(artifact)[stack])
        with torch.no_grad():
            out = net.generate(inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, **cache_kwargs(net, cache))
        runs[name] = out, cache
    (ref, one), (got, split) = runs["one"], runs["split"]
    assert torch.equal(got.sequences.cpu(), ref.sequences)
    torch.testing.assert_close(torch.stack(got.logits, 1).cpu(), torch.stack(ref.logits, 1), atol=1e-4, rtol=1e-4)
    for layer_idx, device in enumerate(("cuda:0", second)):
        placed = {name: str(t.device) for name, t in _layer_tensors(split.layers[layer_idx]).items()}
        assert placed == dict.fromkeys(placed, device), (layer_idx, placed)
    by_device = split.memory_report().by_device()
    assert set(by_device) == {"cuda:0", second}
    assert sum(by_device.values()) == split.nbytes() == split.nbytes(device="cuda:0") + split.nbytes(device=second)
    assert split.nbytes() == one.nbytes()  # a layer's bases move to its device: each counted once, where it is
    one.detach()
    split.detach()

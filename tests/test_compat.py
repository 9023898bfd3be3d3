"""The cache keyword of the installed transformers: cache= from 5.24, past_key_values= before."""

import pytest
from tiny_models import ARCHS, make_tiny_model

from kvpress_aqua.util import compat


class OldModel:
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):
        pass


class NewModel:
    def forward(self, input_ids=None, cache=None, use_cache=None):
        pass


class OpaqueModel:
    def forward(self, *args, **kwargs):
        pass


def test_the_keyword_follows_the_forward_signature():
    assert compat.cache_kwarg(OldModel()) == "past_key_values"
    assert compat.cache_kwarg(NewModel()) == "cache"
    assert compat.cache_kwargs(NewModel(), "c") == {"cache": "c"}


@pytest.mark.parametrize("version,expected", [("4.57.1", "past_key_values"), ("5.23.0", "past_key_values"),
                                              ("5.24.0", "cache"), ("5.30.0.dev0", "cache"), ("6.0.0", "cache")])
def test_an_opaque_forward_goes_by_the_version(monkeypatch, version, expected):
    monkeypatch.setattr(compat.transformers, "__version__", version)
    compat._cache_kwarg_of.cache_clear()
    try:
        assert compat.cache_kwarg(OpaqueModel()) == expected
    finally:
        compat._cache_kwarg_of.cache_clear()


def test_installed_models_agree_with_the_version():
    expected = "cache" if compat.transformers_version() >= compat.CACHE_RENAMED_IN else "past_key_values"
    assert {compat.cache_kwarg(make_tiny_model(arch)) for arch in ARCHS} == {expected}


def test_the_output_cache_is_read_without_the_old_name():
    import torch

    model = make_tiny_model("llama")
    with torch.no_grad():
        out = model(torch.tensor([[5, 9, 17]]), use_cache=True)
    old = compat.transformers_version() < compat.CACHE_RENAMED_IN
    cache = compat.output_cache(out)
    assert cache is (out.past_key_values if old else out.cache)
    assert cache.get_seq_length() == 3

"""Switching a model's attention implementation to the package's, shared by every live cache of that model.

:func:`acquire` registers :func:`~kvpress_aqua.attention.dispatch.compressed_attention` (and SDPA's
mask function under the same name) with ``transformers`` and switches the model to it on behalf
of one cache; :func:`release` drops that cache's need, and the last release gives the model back
the implementation it had before. :func:`switched` does the same for the length of a ``with``
block (calibration records queries and keys through it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .dispatch import ATTENTION_NAME, compressed_attention

__all__ = ["acquire", "register", "release", "switched"]

_ORIGINAL: dict[int, str] = {}
"""``id(model.config)`` -> the attention implementation the model had before the first live cache switched it."""
_HOLDERS: dict[int, set[int]] = {}
"""``id(model.config)`` -> tokens of the live caches that need the switch."""


def _set_attention(model: Any, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def register(name: str, function: Callable[..., Any]) -> None:
    """Register an attention function, with SDPA's mask function, under ``name`` (idempotent)."""
    AttentionInterface.register(name, function)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)


@contextmanager
def switched(model: Any, name: str, function: Callable[..., Any]) -> Iterator[None]:
    """Run ``model`` with the attention ``function`` (registered as ``name``) inside the block.

    The model's previous implementation is restored afterwards, even on error.
    """
    register(name, function)
    previous = model.config._attn_implementation
    try:
        _set_attention(model, name)
        yield
    finally:
        _set_attention(model, previous)


def acquire(model: Any, token: int) -> None:
    """Switch ``model`` to :func:`compressed_attention` on behalf of the cache ``token`` (idempotent)."""
    key = id(model.config)
    if key not in _HOLDERS:
        register(ATTENTION_NAME, compressed_attention)
        original = model.config._attn_implementation
        _ORIGINAL[key] = "sdpa" if original in (None, ATTENTION_NAME) else original
        _HOLDERS[key] = set()
    if model.config._attn_implementation != ATTENTION_NAME:
        _set_attention(model, ATTENTION_NAME)
    _HOLDERS[key].add(token)


def release(model: Any, token: int) -> None:
    """Drop the cache ``token``'s need; the last one gives ``model`` its original attention back."""
    key = id(model.config)
    holders = _HOLDERS.get(key)
    if holders is None or token not in holders:
        return
    holders.discard(token)
    if holders:
        return
    del _HOLDERS[key]
    original = _ORIGINAL.pop(key)
    if model.config._attn_implementation == ATTENTION_NAME:
        _set_attention(model, original)

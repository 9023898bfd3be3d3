"""Differences between the supported transformers versions (4.57.1 up to 5.x), in one place.

transformers 5.24 renamed the ``past_key_values=`` argument of every model's ``forward`` and of
``generate`` to ``cache=``; the old name still works there but emits a ``FutureWarning`` (and goes
away in a later release), while 4.57 knows only ``past_key_values``. :func:`cache_kwarg` names the
keyword a model takes, so callers write ``model(ids, **{cache_kwarg(model): cache})``.

This module imports only ``transformers`` (for its version), so any module can use it without
import cycles.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

import transformers

__all__ = ["CACHE_RENAMED_IN", "cache_kwarg", "cache_kwargs", "transformers_version"]

CACHE_RENAMED_IN = (5, 24)
"""The transformers release whose forward and ``generate`` take ``cache=`` instead of ``past_key_values=``."""


def transformers_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed transformers (pre-release suffixes ignored)."""
    found = re.match(r"(\d+)\.(\d+)", transformers.__version__)
    return (int(found[1]), int(found[2])) if found else (0, 0)


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    try:
        parameters = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError, AttributeError):
        parameters = {}
    if "cache" in parameters:
        return "cache"
    if "past_key_values" in parameters:
        return "past_key_values"
    # a forward hidden behind **kwargs: go by the release that renamed the argument
    return "cache" if transformers_version() >= CACHE_RENAMED_IN else "past_key_values"


def cache_kwarg(model: Any) -> str:
    """The keyword that passes a KV cache to ``model``'s forward and ``generate``.

    Parameters
    ----------
    model : PreTrainedModel
        A causal LM (its class's ``forward`` signature is read once and remembered).

    Returns
    -------
    str
        ``"cache"`` where the forward takes it (transformers >= 5.24), else ``"past_key_values"``.

    """
    return _cache_kwarg_of(type(model))


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{cache_kwarg(model): cache}``, ready to unpack into a forward or ``generate`` call."""
    return {cache_kwarg(model): cache}

"""Differences between the supported transformers versions (4.57.1 up to 5.x), in one place.

transformers 5.24 renamed the ``past_key_values=`` argument of every model's ``forward`` and of
``generate`` to ``cache=``; the old name still works there but emits a ``FutureWarning`` (and goes
away in a later release), while 4.57 knows only ``past_key_values``. :func:`cache_kwarg` names the
keyword a model takes, so callers write ``model(ids, **cache_kwargs(model, cache))``. The outputs
were renamed alike (``out.cache``; ``out.past_key_values`` still works there but logs a deprecation):
:func:`output_cache` reads whichever the output has.

This module imports only ``transformers`` (for its version), so any module can use it without
import cycles.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from typing import Any

import transformers

__all__ = ["CACHE_RENAMED_IN", "cache_kwarg", "cache_kwargs", "output_cache", "transformers_version"]

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


def output_cache(output: Any) -> Any:
    """The cache a model's forward or ``generate`` output carries.

    Parameters
    ----------
    output : ModelOutput
        What a forward (``use_cache=True``) or ``generate(..., return_dict_in_generate=True)`` returned.

    Returns
    -------
    Cache or None
        ``output.cache`` where the output has that field (transformers >= 5.24), else
        ``output.past_key_values``.

    """
    fields = {f.name for f in dataclasses.fields(output)} if dataclasses.is_dataclass(output) else set()
    return getattr(output, "cache" if "cache" in fields else "past_key_values")

"""One parser for policy stacks, used by the CLI, the planner's output and Python code.

A policy stack is written in one of three ways:

- a preset name: a TOML file shipped in the top-level ``policies/`` folder (``kvtool presets``
  lists them), e.g. ``h2o-aqua-4x``;
- a path to such a TOML file, e.g. ``./my-policy.toml``;
- an inline string: ``full`` (no compression) or ``+``-joined entries ``type:key=value,...``, e.g.
  ``h2o:heavy=256,recent=64+aqua:k_ratio=0.5``.

TOML form::

    description = "H2O at a quarter of dense KV bytes, keys pruned to half their channels"
    [[policy]]
    type = "h2o"
    kv = 0.25
    [[policy]]
    type = "aqua"
    k_ratio = 0.5

Token policies take absolute token counts (``heavy``, ``recent``, ``sinks``, ``window``) or a
relative size ``kv``: the fraction of dense KV bytes (keys + values, slot metadata excluded) to
keep at a given context length; :meth:`PolicySpec.build` turns it into token counts once the
context length is known, taking the channel policy's key pruning (and AQUA's exact tokens, which
keep every key channel) into account.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from .policies import H2O, TOVA, SlidingWindow
from .policies.aqua import Aqua
from .policies.base import ChannelPolicy, TokenPolicy

__all__ = ["POLICY_TYPES", "PolicySpec", "list_presets", "parse_policy"]

POLICY_TYPES: dict[str, type] = {
    "h2o": H2O,
    "tova": TOVA,
    "sliding": SlidingWindow,
    "streaming": SlidingWindow,
    "aqua": Aqua,
}
"""Names accepted in ``type = ...`` and inline specs."""

DEFAULT_SINKS = 4
"""Sinks given to relative-size token policies."""


@dataclass(frozen=True)
class PolicySpec:
    """A parsed, not yet built, policy stack.

    Attributes
    ----------
    name : str
        Preset name, file name or the inline string itself.
    entries : tuple of dict
        One ``{"type": ..., knob: value}`` per policy.
    description : str
        Human description (presets carry one).

    """

    name: str
    entries: tuple[dict[str, Any], ...]
    description: str = ""

    @property
    def is_full(self) -> bool:
        """No compression at all."""
        return not self.entries

    @property
    def is_relative(self) -> bool:
        """Whether a token budget depends on the context length (``kv=`` entries)."""
        return any("kv" in e for e in self.entries)

    def _aqua_entry(self) -> dict[str, Any] | None:
        return next((e for e in self.entries if POLICY_TYPES[e["type"]] is Aqua), None)

    def key_ratio(self) -> float:
        """Fraction of key channels kept by the stack's channel policy (1 without one)."""
        entry = self._aqua_entry()
        return 1.0 if entry is None else float(entry.get("k_ratio", Aqua.k_ratio))

    def exact_tokens(self) -> int:
        """AQUA's exact tokens (sinks + recent) per layer and KV head; 0 without key pruning."""
        entry = self._aqua_entry()
        if entry is None or self.key_ratio() == 1:
            return 0
        return int(entry.get("exact_sinks", Aqua.exact_sinks)) + int(entry.get("exact_recent", Aqua.exact_recent))

    def build(self, context: int | None = None) -> list[TokenPolicy | ChannelPolicy]:
        """Instantiate the policies.

        Parameters
        ----------
        context : int, optional
            Context length (prompt tokens) that relative ``kv=`` sizes refer to; required for them.

        Returns
        -------
        list
            Policy objects, ready for :class:`~kvpress_aqua.CompressedCache`.

        """
        return [self._build_one(entry, context) for entry in self.entries]

    def _build_one(self, entry: dict[str, Any], context: int | None) -> TokenPolicy | ChannelPolicy:
        kind = POLICY_TYPES[entry["type"]]
        knobs = {k: v for k, v in entry.items() if k != "type"}
        if "kv" in knobs:
            if context is None or context <= 0:
                raise ValueError(
                    f"policy {self.name!r} sizes its budget as kv={knobs['kv']} of dense bytes; "
                    "give the context length (build(context=N))"
                )
            knobs = _resolve_relative(kind, knobs, context, self.key_ratio(), self.exact_tokens())
        try:
            return kind(**knobs)
        except TypeError as err:
            raise ValueError(f"policy {self.name!r}: bad knobs for {entry['type']}: {err}") from None

    def to_toml(self) -> str:
        """The stack as a preset TOML document (loadable by :func:`parse_policy`)."""
        lines = [f"description = {_toml_value(self.description or self.name)}"]
        for entry in self.entries:
            lines += ["", "[[policy]]"] + [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
        return "\n".join(lines) + "\n"


def _resolve_relative(kind: type, knobs: dict[str, Any], context: int, k_ratio: float, exact: int) -> dict[str, Any]:
    fraction = float(knobs.pop("kv"))
    if not 0 < fraction <= 1:
        raise ValueError(f"kv={fraction}: the fraction of dense KV bytes must be in (0, 1]")
    # A token stored with a fraction k_ratio of its key channels costs (k_ratio + 1) / 2 of a dense one;
    # each of AQUA's exact tokens also keeps its (1 - k_ratio) / 2 dropped key channels, whatever the context.
    tokens = max(2, math.floor((fraction * context - exact * (1 - k_ratio) / 2) * 2 / (k_ratio + 1)))
    sinks = min(int(knobs.pop("sinks", DEFAULT_SINKS)), tokens - 1)
    if kind is SlidingWindow:
        return {"sinks": sinks, "window": tokens - sinks, **knobs}
    rest = tokens - sinks
    recent = rest // 2
    return {"heavy": rest - recent, "recent": recent, "sinks": sinks, **knobs}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _parse_scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _check_entry(entry: dict[str, Any], where: str) -> dict[str, Any]:
    kind = entry.get("type")
    if kind not in POLICY_TYPES:
        raise ValueError(f"{where}: unknown policy type {kind!r}; use one of {', '.join(sorted(POLICY_TYPES))}")
    return entry


def _from_toml(text: str, name: str) -> PolicySpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"policy file {name}: not valid TOML ({err})") from None
    entries = tuple(_check_entry(dict(e), f"policy file {name}") for e in data.get("policy", []))
    return PolicySpec(name=name, entries=entries, description=str(data.get("description", "")))


def _preset_dir() -> resources.abc.Traversable:
    return resources.files("kvpress_aqua.presets")


def list_presets() -> dict[str, str]:
    """Shipped presets: name -> description."""
    out = {}
    for item in sorted(_preset_dir().iterdir(), key=lambda p: p.name):
        if item.name.endswith(".toml"):
            out[item.name[:-5]] = _from_toml(item.read_text(), item.name[:-5]).description
    return out


def parse_policy(spec: str | Path) -> PolicySpec:
    """Parse a preset name, a TOML path or an inline spec string.

    Parameters
    ----------
    spec : str or Path
        ``"full"``, ``"h2o-aqua-4x"``, ``"./mine.toml"`` or ``"h2o:heavy=256,recent=64+aqua:k_ratio=0.5"``.

    Returns
    -------
    PolicySpec

    Raises
    ------
    ValueError
        Naming the bad part and the accepted forms.

    """
    text = str(spec).strip()
    if text in ("", "full", "none"):
        return PolicySpec(name="full", entries=(), description="no compression (DynamicCache)")
    if text.endswith(".toml"):
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"policy file {text!r} does not exist")
        return _from_toml(path.read_text(), path.stem)
    preset = _preset_dir() / f"{text}.toml"
    if ":" not in text and preset.is_file():
        return _from_toml(preset.read_text(), text)
    entries = []
    for part in text.split("+"):
        kind, _, args = part.strip().partition(":")
        entry: dict[str, Any] = {"type": kind.strip().lower()}
        for pair in filter(None, (a.strip() for a in args.split(","))):
            key, eq, value = pair.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"policy {text!r}: expected key=value, got {pair!r} (e.g. 'h2o:heavy=256,recent=64')")
            entry[key.strip()] = _parse_scalar(value.strip())
        if entry["type"] not in POLICY_TYPES:
            known = ", ".join(sorted(list_presets()))
            raise ValueError(
                f"unknown policy {text!r}: not a preset ({known}), not a .toml file, and {kind!r} is not a policy "
                f"type ({', '.join(sorted(POLICY_TYPES))})"
            )
        entries.append(entry)
    return PolicySpec(name=text, entries=tuple(entries))

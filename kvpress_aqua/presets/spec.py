"""One parser for policy stacks, used by the CLI, the planner's output and Python code.

A policy stack is written in one of three ways:

- a preset name: a TOML file shipped in ``kvpress_aqua/presets/`` (:func:`list_presets`
  lists them), e.g. ``h2o-aqua-4x``;
- a path to such a TOML file, e.g. ``./my-policy.toml``;
- an inline string: ``full`` (no compression) or ``+``-joined entries ``type:key=value,...``, e.g.
  ``h2o:heavy=256,recent=64+aqua:k_ratio=0.5``.

TOML form::

    description = "H2O at a quarter of dense KV bytes, keys pruned to half their channels"
    [[policy]]
    type = "h2o"
    kv_fraction = 0.25
    [[policy]]
    type = "aqua"
    k_ratio = 0.5

Token policies take absolute token counts (``heavy``, ``recent``, ``sinks``, ``window``) or a
relative size ``kv_fraction``: the fraction of dense KV bytes (keys + values, slot metadata
excluded) to keep at a given context length; :meth:`PolicySpec.build` turns it into token counts
once the context length is known (:func:`kvpress_aqua.core.accounting.kv_fraction_budget`, which
takes the channel policy's key pruning and AQUA's exact tokens into account), split into the
policy's knobs by :meth:`kvpress_aqua.policies.registry.PolicyType.split_budget`. The knob was
called ``kv`` before; a spec still using it is refused with a message naming the new name.

Every spec is checked in full by :func:`parse_policy`, before any model is loaded: a TOML file holds
only ``description`` and ``[[policy]]`` tables (``policy = []`` for no compression), every entry
names a known ``type``, every knob is a field of that policy (plus ``kv_fraction`` for token
policies) with a value of the right type, and absolute knobs pass the policy's own checks. Errors
name the file or inline string, the knob, the bad value and the valid choices.

Policy names and kinds come from :mod:`kvpress_aqua.policies.registry`, so this module imports
without torch: the policy classes (and torch) are loaded only when a spec is checked against their
dataclass fields (:func:`parse_policy`, :attr:`PolicySpec.key`) or built. :meth:`PolicySpec.to_toml`
needs none of them (the planner writes presets with it).

A spec is identified by its content, :attr:`PolicySpec.key` (a hash of its entries), not by its
name: results of two different files called ``p.toml`` never mix, and an edited file is a new spec.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from ..core.accounting import kv_fraction_budget
from ..policies.registry import DEFAULT_SINKS, KINDS, PolicyType, policy_names, policy_type

if TYPE_CHECKING:
    from ..policies.base import ChannelPolicy, TokenPolicy

__all__ = [
    "RELATIVE_KNOB",
    "TOML_KEYS",
    "PolicySpec",
    "list_presets",
    "parse_policy",
    "planned_prefill_chunk",
    "policy_knobs",
]

TOML_KEYS = ("description", "prefill_chunk", "policy")
"""The top-level keys a policy TOML file may hold."""

RELATIVE_KNOB = "kv_fraction"
"""The relative size of a token policy: the fraction of dense KV bytes kept, in (0, 1]."""
_OLD_RELATIVE_KNOB = "kv"
"""What :data:`RELATIVE_KNOB` was called before (bytes elsewhere, as in ``kv_bytes``); refused with a hint."""

KEY_CHARS = 12
"""Hex digits of :attr:`PolicySpec.key`."""

_NOMINAL_CONTEXT = 4096
"""Context a relative (``kv_fraction``) spec is built at by :func:`parse_policy`, to run the policies' own checks."""

_KIND_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


@dataclass(frozen=True)
class PolicySpec:
    """A parsed, not yet built, policy stack.

    Attributes
    ----------
    name : str
        Display name: the preset name, the TOML path as typed, or the inline string itself.
    entries : tuple of dict
        One ``{"type": ..., knob: value}`` per policy.
    description : str
        Human description (presets carry one).
    source : str
        Where it came from: ``"preset"``, ``"file"`` or ``"inline"``.
    prefill_chunk : int or None
        Tokens per prefill forward the stack was planned for (``kvtool plan --emit-preset`` writes the
        chunk its memory prediction depends on); commands that build a cache from the spec use it
        unless ``--prefill-chunk`` is given (:func:`planned_prefill_chunk`). Not part of :attr:`key`.

    """

    name: str
    entries: tuple[dict[str, Any], ...]
    description: str = ""
    source: str = "inline"
    prefill_chunk: int | None = None

    @property
    def is_full(self) -> bool:
        """No compression at all."""
        return not self.entries

    @property
    def is_relative(self) -> bool:
        """Whether a token budget depends on the context length (``kv_fraction`` entries)."""
        return any(RELATIVE_KNOB in e for e in self.entries)

    @property
    def key(self) -> str:
        """Content key: the first :data:`KEY_CHARS` hex digits of the sha256 of the canonical JSON of the entries.

        Equal for equal entries whatever the name, the source or the description (type aliases
        such as ``streaming``/``sliding`` and ``1``/``1.0`` for a float knob count as equal), and
        different as soon as one knob differs.
        """
        canonical = [_canonical_entry(e) for e in self.entries]
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS]

    def _channel_knob(self, name: str, absent: Any) -> Any:
        """A knob of the stack's channel policy, its registry default if not given, ``absent`` without one."""
        entry = next((e for e in self.entries if policy_type(e["type"]).kind == "channel"), None)
        if entry is None:
            return absent
        return entry.get(name, policy_type(entry["type"]).defaults.get(name, absent))

    def key_ratio(self) -> float:
        """Fraction of key channels kept by the stack's channel policy (1 without one)."""
        return float(self._channel_knob("k_ratio", 1.0))

    def exact_tokens(self) -> int:
        """AQUA's exact tokens (sinks + recent) per layer and KV head; 0 without key pruning."""
        if self.key_ratio() == 1:
            return 0
        return int(self._channel_knob("exact_sinks", 0)) + int(self._channel_knob("exact_recent", 0))

    def build(self, context: int | None = None) -> list[TokenPolicy | ChannelPolicy]:
        """Instantiate the policies.

        Parameters
        ----------
        context : int, optional
            Context length (prompt tokens) that relative ``kv_fraction`` sizes refer to; required for them.

        Returns
        -------
        list
            Policy objects, ready for :class:`~kvpress_aqua.CompressedCache`.

        """
        return [self._build_one(entry, context) for entry in self.entries]

    def _build_one(self, entry: dict[str, Any], context: int | None) -> TokenPolicy | ChannelPolicy:
        row = policy_type(entry["type"])
        knobs = {k: v for k, v in entry.items() if k != "type"}
        if RELATIVE_KNOB in knobs:
            if context is None or context <= 0:
                raise ValueError(
                    f"policy {self.name!r} sizes its budget as {RELATIVE_KNOB}={knobs[RELATIVE_KNOB]} of dense "
                    "bytes; give the context length (build(context=N))"
                )
            knobs = _resolve_relative(row, knobs, context, self.key_ratio(), self.exact_tokens())
        try:
            return row.load()(**knobs)
        except TypeError as err:
            raise ValueError(f"policy {self.name!r}: bad knobs for {entry['type']}: {err}") from None

    def to_toml(self) -> str:
        """The stack as a preset TOML document (loadable by :func:`parse_policy`)."""
        lines = [f"description = {_toml_value(self.description or self.name)}"]
        if self.prefill_chunk is not None:
            lines.append(f"prefill_chunk = {self.prefill_chunk}")
        if not self.entries:
            lines.append("policy = []")
        for entry in self.entries:
            lines += ["", "[[policy]]"] + [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
        return "\n".join(lines) + "\n"


def _resolve_relative(row: PolicyType, knobs: dict[str, Any], context: int, k_ratio: float,
                      exact: int) -> dict[str, Any]:
    """Absolute knobs for a ``kv_fraction`` entry at ``context`` tokens (the other knobs kept as given)."""
    fraction = float(knobs.pop(RELATIVE_KNOB))
    if not 0 < fraction <= 1:
        raise ValueError(f"{RELATIVE_KNOB}={fraction}: the fraction of dense KV bytes must be in (0, 1]")
    if row.sizes_itself:  # its bytes depend on the model's head width: the policy sizes itself when built
        return {**knobs, RELATIVE_KNOB: fraction, "context": context}
    tokens = kv_fraction_budget(fraction, context, k_ratio, exact)
    return {**row.split_budget(tokens, int(knobs.pop("sinks", DEFAULT_SINKS))), **knobs}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


# ---------------------------------------------------------------------------------- validation
def _show(value: Any) -> str:
    """A knob value as it is written in TOML (``true``, ``1.5``, ``"x"``), for error messages."""
    return _toml_value(value) if isinstance(value, bool | int | float | str) else repr(value)


def _value_kinds(annotation: Any) -> tuple[str, ...]:
    """The plain value kinds (bool, int, float, str) a dataclass field annotation accepts."""
    names = annotation.split("|") if isinstance(annotation, str) else [getattr(annotation, "__name__", "")]
    kinds = []
    for name in (n.strip() for n in names):
        kind = "str" if name == "Path" else name
        if kind in _KIND_WORDS and kind not in kinds:
            kinds.append(kind)
    return tuple(kinds)


def policy_knobs(name: str) -> dict[str, tuple[tuple[str, ...], Any]]:
    """The knobs a policy type takes: knob -> (accepted value kinds, default or ``dataclasses.MISSING``).

    The knobs are the dataclass fields of the type's class (those set at construction; the class
    is loaded, with torch), plus :data:`RELATIVE_KNOB` (a float, the fraction of dense KV bytes) for
    token policies with a budget.

    Parameters
    ----------
    name : str
        A policy type name or alias (``"h2o"``, ``"streaming"``).

    """
    row = policy_type(name)
    knobs: dict[str, tuple[tuple[str, ...], Any]] = {}
    for f in dataclasses.fields(row.load()):
        if f.init and not f.name.startswith("_"):
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            knobs[f.name] = (_value_kinds(f.type), f.default if has_default else dataclasses.MISSING)
    if row.split:
        knobs[RELATIVE_KNOB] = (("float",), dataclasses.MISSING)
    return knobs


def _describe_knobs(type_name: str) -> str:
    parts = []
    for name, (kinds, default) in policy_knobs(type_name).items():
        text = f"{name} ({' or '.join(kinds) or 'object'}"
        if name == RELATIVE_KNOB:
            text += ", fraction of dense KV bytes in (0, 1]"
        elif default is not dataclasses.MISSING:
            text += f", default {default!r}"
        parts.append(text + ")")
    return f"{type_name} takes {', '.join(parts)}"


def _canonical_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry with its type's one name and ints of float knobs as floats (for content keys)."""
    try:
        row = policy_type(str(entry.get("type", "")))
    except ValueError:
        return dict(entry)
    knobs = policy_knobs(row.name)
    out: dict[str, Any] = {"type": row.name}
    for name, value in entry.items():
        if name == "type":
            continue
        kinds = knobs.get(name, ((), None))[0]
        is_int = isinstance(value, int) and not isinstance(value, bool)
        out[name] = float(value) if is_int and "float" in kinds and "int" not in kinds else value
    return out


def _check_value(value: Any, kinds: tuple[str, ...]) -> bool:
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return "int" in kinds or "float" in kinds
    if isinstance(value, float):
        return "float" in kinds
    return isinstance(value, str) and "str" in kinds


def _check_entry(raw: Any, where: str) -> dict[str, Any]:
    """A validated copy of one policy entry (type lower-cased, ints of float knobs as floats)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a policy entry must be a table (type = ..., knobs), got {raw!r}")
    kind_name = raw.get("type")
    if not isinstance(kind_name, str) or kind_name.lower() not in policy_names():
        what = "no type" if kind_name is None else f"unknown policy type {kind_name!r}"
        raise ValueError(f"{where}: {what}; use type = one of {', '.join(policy_names())}")
    type_name = kind_name.lower()
    row = policy_type(type_name)
    knobs = policy_knobs(type_name)
    entry: dict[str, Any] = {"type": type_name}
    for name, value in raw.items():
        if name == "type":
            continue
        if name == _OLD_RELATIVE_KNOB and RELATIVE_KNOB in knobs:
            raise ValueError(f"{where}: {type_name} {name} = {_show(value)}: the knob {name} is now {RELATIVE_KNOB} "
                             f"(the fraction of dense KV bytes kept); write {RELATIVE_KNOB} = {_show(value)}")
        if name not in knobs:
            close = difflib.get_close_matches(name, list(knobs), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: bad knobs for {type_name}: unknown knob {name!r} = {_show(value)}{hint}; "
                             f"{_describe_knobs(type_name)}")
        kinds = knobs[name][0]
        if not _check_value(value, kinds):
            wanted = " or ".join(_KIND_WORDS[k] for k in kinds)
            raise ValueError(f"{where}: bad knobs for {type_name}: {name} = {_show(value)} must be {wanted}; "
                             f"{_describe_knobs(type_name)}")
        entry[name] = _canonical_entry({"type": type_name, name: value})[name]
    if RELATIVE_KNOB in entry:
        shown = f"{type_name} {RELATIVE_KNOB} = {_show(raw[RELATIVE_KNOB])}"
        if not 0 < entry[RELATIVE_KNOB] <= 1:
            raise ValueError(f"{where}: {shown}: the fraction of dense KV bytes kept must be in (0, 1], "
                             f"e.g. {RELATIVE_KNOB} = 0.25")
        given = [k for k in row.split if k in entry]
        if given:
            raise ValueError(f"{where}: {shown} computes {' and '.join(row.split)} from the context; give "
                             f"{RELATIVE_KNOB} or {', '.join(given)}, not both")
    else:
        missing = [k for k, (_, default) in knobs.items() if default is dataclasses.MISSING and k != RELATIVE_KNOB
                   and k not in entry]
        if missing:
            relative = f" (or {RELATIVE_KNOB} = a fraction of dense KV bytes)" if RELATIVE_KNOB in knobs else ""
            raise ValueError(f"{where}: {type_name} needs {', '.join(missing)}{relative}; {_describe_knobs(type_name)}")
    return entry


def _checked_spec(spec: PolicySpec, where: str) -> PolicySpec:
    """``spec`` once its stack is valid: one policy of each kind, and each policy's own checks pass."""
    for kind in KINDS:
        names = [e["type"] for e in spec.entries if policy_type(e["type"]).kind == kind]
        if len(names) > 1:
            raise ValueError(f"{where}: a stack holds at most one {kind} policy, got {' and '.join(names)}")
    try:
        spec.build(context=_NOMINAL_CONTEXT if spec.is_relative else None)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return spec


# ------------------------------------------------------------------------------------ parsing
def _parse_scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _from_toml(text: str, name: str, where: str, source: str) -> PolicySpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{where}: not valid TOML ({err})") from None
    for key, value in data.items():
        if key not in TOML_KEYS:
            close = difflib.get_close_matches(key, TOML_KEYS, n=1)
            hint = f" (did you mean [[{close[0]}]]?)" if close == ["policy"] else (
                f" (did you mean {close[0]!r}?)" if close else "")
            raise ValueError(f"{where}: unknown top-level key {key!r} = {_show(value)}{hint}; a policy file holds only "
                             "description = \"...\", prefill_chunk = N and [[policy]] tables (policy = [] for no "
                             "compression)")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"{where}: description = {description!r} must be a string")
    chunk = data.get("prefill_chunk")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"{where}: prefill_chunk = {_show(chunk)} must be a positive whole number of tokens per "
                         "prefill forward, e.g. prefill_chunk = 512 (leave it out for the command's default)")
    if "policy" not in data:
        raise ValueError(f"{where}: no [[policy]] tables; add [[policy]] tables (type = "
                         f"{' | '.join(policy_names())}, knobs), or write policy = [] for no compression")
    policies = data["policy"]
    if isinstance(policies, dict):
        raise ValueError(f"{where}: [policy] is a single table; write [[policy]] (an array of tables, one per "
                         "policy of the stack)")
    if not isinstance(policies, list):
        raise ValueError(f"{where}: policy = {policies!r} must be an array of tables ([[policy]]), or [] for no "
                         "compression")
    entries = tuple(_check_entry(e, f"{where}, [[policy]] #{i}") for i, e in enumerate(policies, 1))
    return _checked_spec(PolicySpec(name=name, entries=entries, description=description, source=source,
                                    prefill_chunk=chunk), where)


def _preset_dir() -> resources.abc.Traversable:
    return resources.files("kvpress_aqua.presets")


def _load_preset(name: str) -> PolicySpec:
    item = _preset_dir() / f"{name}.toml"
    return _from_toml(item.read_text(), name, f"preset {name!r}", "preset")


def planned_prefill_chunk(specs: Iterable[PolicySpec], default: int | None) -> int | None:
    """The prefill chunk to run ``specs`` with when the user gave none: the smallest any of them carries.

    A spec written by ``kvtool plan`` carries the chunk its memory prediction depends on; the
    smallest of several keeps every such plan within its memory. ``default`` when none carries one.
    """
    chunks = [s.prefill_chunk for s in specs if s.prefill_chunk is not None]
    return min(chunks) if chunks else default


def list_presets() -> dict[str, str]:
    """Shipped presets: name -> description."""
    out = {}
    for item in sorted(_preset_dir().iterdir(), key=lambda p: p.name):
        if item.name.endswith(".toml"):
            out[item.name[:-5]] = _load_preset(item.name[:-5]).description
    return out


def parse_policy(spec: str | Path) -> PolicySpec:
    """Parse and check a preset name, a TOML path or an inline spec string.

    Parameters
    ----------
    spec : str or Path
        ``"full"``, ``"h2o-aqua-4x"``, ``"./mine.toml"`` or ``"h2o:heavy=256,recent=64+aqua:k_ratio=0.5"``.

    Returns
    -------
    PolicySpec
        Named by the preset name, the path as given (so that a file never takes a preset's name, and
        two files of the same name stay apart) or the inline string.

    Raises
    ------
    ValueError
        Naming the file or string, the bad key or value and the accepted ones: unknown top-level
        keys, a ``[policy]`` table, no ``[[policy]]`` at all (``policy = []`` means no compression),
        unknown types or knobs, values of the wrong type (``heavy = 1.5``, ``heavy = true``),
        ``kv_fraction`` outside (0, 1], the old name ``kv`` of that knob, and whatever the policies'
        own checks refuse.

    """
    text = str(spec).strip()
    if text in ("", "full", "none"):
        return PolicySpec(name="full", entries=(), description="no compression (DynamicCache)", source="preset")
    if text.endswith(".toml"):
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"policy file {text!r} does not exist")
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"policy file {text!r} cannot be read ({err})") from None
        return _from_toml(content, text, f"policy file {text!r}", "file")
    if ":" not in text and "/" not in text and (_preset_dir() / f"{text}.toml").is_file():
        return _load_preset(text)
    where = f"policy {text!r}"
    entries = []
    for part in text.split("+"):
        kind, _, args = part.strip().partition(":")
        raw: dict[str, Any] = {"type": kind.strip().lower()}
        for pair in filter(None, (a.strip() for a in args.split(","))):
            key, eq, value = pair.partition("=")
            key = key.strip()
            if not eq or not key:
                raise ValueError(f"{where}: expected key=value, got {pair!r} (e.g. 'h2o:heavy=256,recent=64')")
            if key in raw:
                raise ValueError(f"{where}: {key} is given twice in {part.strip()!r}")
            raw[key] = _parse_scalar(value.strip())
        if raw["type"] not in policy_names():
            known = ", ".join(sorted(list_presets()))
            raise ValueError(
                f"unknown policy {text!r}: not a preset ({known}), not a .toml file, and {kind!r} is not a policy "
                f"type ({', '.join(policy_names())})"
            )
        entries.append(_check_entry(raw, where))
    return _checked_spec(PolicySpec(name=text, entries=tuple(entries)), where)

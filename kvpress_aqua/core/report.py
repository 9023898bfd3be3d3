"""What a compressed cache holds, per layer and per kind of tensor, next to what ``DynamicCache`` would hold."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table

from ..util.sizes import format_bytes

__all__ = ["MemoryReport", "MemoryRow"]


@dataclass(frozen=True)
class MemoryRow:
    """One layer's line in a :class:`MemoryReport`."""

    layer: int
    kind: str
    slots: int
    held: int
    key_bytes: int
    value_bytes: int
    meta_bytes: int
    dense_bytes: int
    host_bytes: int = 0
    device: str = ""
    """Where the layer's tensors live (its keys' device, ``"cuda:1"``); ``""`` for a layer not yet used."""

    @property
    def total(self) -> int:
        """All bytes the layer holds on its device (a retrieval tier's offloaded rows are :attr:`host_bytes`)."""
        return self.key_bytes + self.value_bytes + self.meta_bytes


@dataclass(frozen=True)
class MemoryReport:
    """Bytes held per layer and per kind, with what ``DynamicCache`` would hold; rich-renderable.

    Attributes
    ----------
    rows : tuple of MemoryRow
        One per decoder layer.
    policy_bytes : int
        The policies' own tensors (projection matrices, proxy bases).
    seen : int
        Tokens seen.
    policy_devices : tuple of (str, int)
        :attr:`policy_bytes` split by the device holding them, ``(("cuda:0", n), ...)``.

    """

    rows: tuple[MemoryRow, ...]
    policy_bytes: int
    seen: int
    policy_devices: tuple[tuple[str, int], ...] = ()

    @property
    def total(self) -> int:
        """Every byte the cache holds, projection matrices included."""
        return sum(r.total for r in self.rows) + self.policy_bytes

    @property
    def host(self) -> int:
        """Bytes kept off the device (offloaded retrieval tiers)."""
        return sum(r.host_bytes for r in self.rows)

    @property
    def dense(self) -> int:
        """Bytes ``DynamicCache`` would hold after the same tokens."""
        return sum(r.dense_bytes for r in self.rows)

    def by_device(self, tier: str = "device") -> dict[str, int]:
        """Bytes per device (``{"cuda:0": ..., "cuda:1": ...}``), policy tensors included; sums to the tier's total.

        Parameters
        ----------
        tier : {"device", "host", "all"}
            ``device``: each layer's bytes on its own device (:attr:`total`); ``host``: the
            offloaded tiers, in host memory (``"cpu"``; :attr:`host`); ``all``: both.

        """
        if tier not in ("device", "host", "all"):
            raise ValueError(f"by_device(tier={tier!r}): use 'device', 'host' or 'all'")
        parts: list[tuple[str, int]] = []
        if tier != "host":
            parts += [(r.device, r.total) for r in self.rows if r.total]
            parts += list(self.policy_devices)
        if tier != "device":
            parts += [("cpu", r.host_bytes) for r in self.rows if r.host_bytes]
        out: dict[str, int] = {}
        for device, n in parts:
            out[device] = out.get(device, 0) + n
        return out

    def bytes_on(self, device: object, tier: str = "device") -> int:
        """Bytes of the tier (see :meth:`by_device`) on ``device`` (``"cuda:1"``, a ``torch.device``).

        A device named without an index (``"cuda"``) matches every device of its type.
        """
        want = str(device)
        return sum(n for name, n in self.by_device(tier).items() if want in (name, name.split(":")[0]))

    def by_kind(self) -> dict[str, int]:
        """Bytes per kind: keys, values, slot metadata, policy tensors."""
        return {
            "keys": sum(r.key_bytes for r in self.rows),
            "values": sum(r.value_bytes for r in self.rows),
            "metadata": sum(r.meta_bytes for r in self.rows),
            "policy": self.policy_bytes,
        }

    def _unit(self) -> tuple[str, int]:
        """One binary unit for every byte column: the largest that keeps a layer's largest number at 1 or more."""
        largest = max((max(r.total, r.dense_bytes) for r in self.rows), default=0)
        unit, scale = "B", 1
        for name in ("KiB", "MiB", "GiB", "TiB"):
            if largest >= scale * 1024:
                unit, scale = name, scale * 1024
        return unit, scale

    def tables(self, width: int = 120) -> list[Table]:
        """The report as rich tables no wider than ``width``: one, or two (slots and bytes) when it is narrow.

        Bytes are in one unit, named in the title, so that every number stays whole (never ``138…``).
        """
        unit, scale = self._unit()
        digits = 0 if unit == "B" else 2

        def fmt(n: int) -> str:
            return f"{n / scale:.{digits}f}"

        ratio = self.total / self.dense if self.dense else float("nan")
        kinds = self.by_kind()
        head = ["layer", "kind", "slots", "held"]
        tail = ["keys", "values", "meta", "total", "dense"]
        body = [[str(r.layer), r.kind, str(r.slots), str(r.held), fmt(r.key_bytes), fmt(r.value_bytes),
                 fmt(r.meta_bytes), fmt(r.total), fmt(r.dense_bytes)] for r in self.rows]
        last = ["all", "", "", str(sum(r.held for r in self.rows)), fmt(kinds["keys"]), fmt(kinds["values"]),
                fmt(kinds["metadata"]), fmt(self.total), fmt(self.dense)]
        widths = [max(len(h), *(len(row[i]) for row in [*body, last])) + 3 for i, h in enumerate(head + tail)]
        groups = [range(9)] if 1 + sum(widths) <= width else [range(4), [0, 4, 5, 6, 7, 8]]
        title = (f"KV cache after {self.seen} tokens: {format_bytes(self.total)} held, {format_bytes(self.dense)} "
                 f"dense ({ratio:.1%}); bytes in {unit}")
        caption = "held = valid tokens (sum over sequences and KV heads); meta = per-slot index, validity, scores"
        if self.policy_bytes:
            caption += f"; total includes {format_bytes(self.policy_bytes)} of projection matrices"
        if self.host:
            caption += f"; a host tier holds {format_bytes(self.host)} more (every token's keys and values)"
        devices = self.by_device()
        if len(devices) > 1:
            caption += "; by device: " + ", ".join(f"{d} {format_bytes(n)}" for d, n in sorted(devices.items()))
        out = []
        for n, group in enumerate(groups):
            table = Table(title=title if n == 0 else None, caption=caption if n == len(groups) - 1 else None)
            for i in group:
                table.add_column((head + tail)[i], justify="left" if i == 1 else "right", no_wrap=True)
            for row in body:
                table.add_row(*(row[i] for i in group))
            table.add_section()
            table.add_row(*(last[i] for i in group))
            out.append(table)
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from self.tables(options.max_width)

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.by_kind().items())
        host = f", {format_bytes(self.host)} in the host tier" if self.host else ""
        return (f"KV cache: {format_bytes(self.total)} held ({kinds}){host} vs {format_bytes(self.dense)} dense "
                f"after {self.seen} tokens")

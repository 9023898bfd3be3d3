"""What a compressed cache holds, per layer and per kind of tensor, next to what ``DynamicCache`` would hold."""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def total(self) -> int:
        """All bytes the layer holds."""
        return self.key_bytes + self.value_bytes + self.meta_bytes


@dataclass(frozen=True)
class MemoryReport:
    """Bytes held per layer and per kind, with what ``DynamicCache`` would hold; rich-renderable."""

    rows: tuple[MemoryRow, ...]
    policy_bytes: int
    seen: int

    @property
    def total(self) -> int:
        """Every byte the cache holds, projection matrices included."""
        return sum(r.total for r in self.rows) + self.policy_bytes

    @property
    def dense(self) -> int:
        """Bytes ``DynamicCache`` would hold after the same tokens."""
        return sum(r.dense_bytes for r in self.rows)

    def by_kind(self) -> dict[str, int]:
        """Bytes per kind: keys, values, slot metadata, policy tensors."""
        return {
            "keys": sum(r.key_bytes for r in self.rows),
            "values": sum(r.value_bytes for r in self.rows),
            "metadata": sum(r.meta_bytes for r in self.rows),
            "policy": self.policy_bytes,
        }

    def __rich__(self) -> Table:
        fmt = format_bytes
        ratio = self.total / self.dense if self.dense else float("nan")
        table = Table(title=f"KV cache after {self.seen} tokens: {fmt(self.total)} held, {fmt(self.dense)} dense "
                      f"({ratio:.1%})")
        for col in ("layer", "kind", "slots", "held", "keys", "values", "meta", "total", "dense"):
            table.add_column(col, justify="left" if col == "kind" else "right", no_wrap=True)
        for r in self.rows:
            table.add_row(str(r.layer), r.kind, str(r.slots), str(r.held), fmt(r.key_bytes), fmt(r.value_bytes),
                          fmt(r.meta_bytes), fmt(r.total), fmt(r.dense_bytes))
        kinds = self.by_kind()
        table.add_section()
        table.add_row("all", "", "", str(sum(r.held for r in self.rows)), fmt(kinds["keys"]), fmt(kinds["values"]),
                      fmt(kinds["metadata"]), fmt(self.total), fmt(self.dense))
        table.caption = "held = valid tokens (sum over sequences and KV heads); meta = per-slot index, validity, scores"
        if self.policy_bytes:
            table.caption += f"; total includes {fmt(self.policy_bytes)} of AQUA projection matrices"
        return table

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.by_kind().items())
        return (f"KV cache: {format_bytes(self.total)} held ({kinds}) vs {format_bytes(self.dense)} dense after "
                f"{self.seen} tokens")

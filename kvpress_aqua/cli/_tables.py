"""Result tables that fit the terminal: names fold onto more lines, numbers stay whole, columns split across tables.

Not a command: what the tables of ``needle``, ``demo``, ``ppl`` and ``generate`` share. A table
has key columns (a policy name, a protocol), repeated in every table it is split into, and value
columns (numbers, short words) that never wrap. :func:`fit_tables` puts as many value columns
next to the keys as the console's width allows and starts another table for the rest, so at 80
columns a wide grid comes out as two tables rather than with ``25.…`` cells. Names (policies,
generated text) fold: a long one takes several lines of its column, never an ellipsis.

Light: imports rich only when a table is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["FOLD_WIDTH", "Column", "bytes_column", "fit_tables"]

FOLD_WIDTH = 12
"""The narrowest a folding column is made before value columns move to another table."""
_CHROME = 3
"""Characters a column adds beside its content: one space of padding on each side and one border."""


@dataclass(frozen=True)
class Column:
    """One column: its header and how its cells behave.

    Attributes
    ----------
    header : str
        Short (it never wraps in a value column).
    fold : bool
        A name or text: folds onto more lines when the column is narrow (never cut).
    justify : str
        ``"left"`` or ``"right"``.

    """

    header: str
    fold: bool = False
    justify: str = "right"


def bytes_column(values: Sequence[int | float | None], what: str = "KV") -> tuple[str, list[str]]:
    """A header naming one binary unit for all ``values`` and the numbers in it (``"KV MiB"``, ``["138.28"]``).

    The unit is the largest one (B, KiB, MiB, GiB, TiB) that keeps the largest value at 1 or more;
    ``None`` shows as ``-``.
    """
    largest = max((abs(v) for v in values if v is not None), default=0)
    unit, scale = "B", 1
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if largest >= scale * 1024:
            unit, scale = name, scale * 1024
    digits = 0 if unit == "B" else 2
    return f"{what} {unit}", ["-" if v is None else f"{v / scale:.{digits}f}" for v in values]


def _width(column: Column, cells: Sequence[str]) -> int:
    longest = max([len(column.header), *(max((len(line) for line in c.splitlines()), default=0) for c in cells)])
    return min(longest, FOLD_WIDTH) if column.fold else longest


def fit_tables(
    title: str | None, caption: str | None, keys: Sequence[Column], values: Sequence[Column],
    rows: Sequence[Sequence[str]], width: int,
) -> list[Table]:
    """Tables of ``rows`` that each fit ``width`` columns: the key columns in each, the value columns split.

    Parameters
    ----------
    title, caption : str or None
        The first table's title and the last one's caption.
    keys : sequence of Column
        Columns repeated in every table (the first cells of each row).
    values : sequence of Column
        The other columns, in order; a table takes as many as fit, at least one.
    rows : sequence of sequence of str
        Cells, keys first.
    width : int
        The console's width.

    Returns
    -------
    list of Table
        One table when everything fits, else several; a single value column wider than ``width``
        still gets its own table (the console then crops it: make such columns fold).

    """
    from rich.table import Table

    cells = list(zip(*rows, strict=True)) if rows else [()] * (len(keys) + len(values))
    widths = [_width(c, col) for c, col in zip([*keys, *values], cells, strict=True)]
    base = 1 + sum(w + _CHROME for w in widths[:len(keys)])
    groups: list[list[int]] = [[]]
    used = base
    for i in range(len(keys), len(widths)):
        need = widths[i] + _CHROME
        if groups[-1] and used + need > width:
            groups.append([])
            used = base
        groups[-1].append(i)
        used += need
    tables = []
    for n, group in enumerate(groups):
        table = Table(title=title if n == 0 else None, caption=caption if n == len(groups) - 1 else None)
        for i in [*range(len(keys)), *group]:
            column = keys[i] if i < len(keys) else values[i - len(keys)]
            table.add_column(column.header, justify=column.justify, no_wrap=not column.fold,
                             overflow="fold" if column.fold else "ellipsis")
        for row in rows:
            table.add_row(*(row[i] for i in [*range(len(keys)), *group]))
        tables.append(table)
    return tables

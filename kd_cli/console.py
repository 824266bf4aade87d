"""The one way kd prints a result table: a rich table, then plain lines below it (where the run is, what a
figure means). Long paths go below the table, whole, as a cell would cut them."""

from __future__ import annotations

from collections.abc import Sequence


def print_table(
    title: str,
    columns: Sequence[tuple[str, str]],
    rows: Sequence[Sequence[str]],
    *,
    notes: Sequence[str] = (),
    width: int | None = None,
    bold_last: bool = False,
) -> None:
    """`columns`: (header, justify) with justify left | right; `width`: None for the terminal's (a pipe or a
    file gets what the caller asks, so wide rows do not wrap in logs)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for header, justify in columns:
        table.add_column(header, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for index, row in enumerate(rows):
        table.add_row(*row, style="bold" if bold_last and index == len(rows) - 1 else None)
    console = Console(width=width)
    console.print(table)
    for line in notes:
        console.print(line, highlight=False, markup=False, soft_wrap=True)

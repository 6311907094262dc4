"""Plain-text tables: every command's readable output goes through :func:`format_table`."""

from __future__ import annotations


def format_table(rows: list[tuple[str, ...]], right: set[int] | None = None) -> str:
    """Align rows (first row is the header) into a plain-text table."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = right if right is not None else set(range(1, len(widths)))

    def fmt(row: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + [fmt(r) for r in rows[1:]])

"""The comparison table every benchmark prints: aligned text, or GitHub markdown with `--markdown`."""

from __future__ import annotations

from collections.abc import Sequence


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    """First column left-aligned, numbers right-aligned, the last column (a status) left-aligned in markdown."""
    table = [list(header)] + [list(row) for row in rows]
    if markdown:
        lines = ["| " + " | ".join(line) + " |" for line in table]
        lines.insert(1, "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + [":---"]) + "|")
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    aligned = [[line[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(line[1:], widths[1:])] for line in table]
    return "\n".join("  ".join(line) for line in aligned)

"""Markdown tables: the one writer of every table the suite prints or saves (``md4 zeroshot``, the
sweep report, the benchmarks). It imports no torch and no pandas (``md4-sweep report`` uses it).

A cell that is a string is kept as written, so a caller formats numbers as it wants them read
(``f"{x:.4f}"`` stays ``3.6000``, where tabulate would reprint it as ``3.6``); a number is written
with ``floatfmt`` (floats) or ``str`` (integers), ``None`` as an empty cell, and ``|`` in text is
escaped. Columns of numbers are right-aligned.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def format_cell(value: Any, floatfmt: str = "g") -> str:
    """One cell's text (see the module's docstring)."""
    if value is None:
        return ""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
        return format(value, floatfmt) if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|")


def markdown_table(rows: Iterable[Mapping[str, Any]] | Any, columns: Sequence[str] | None = None, *,
                   index: bool = False, floatfmt: str = "g", align: str | None = None, pad: bool = True) -> str:
    """``rows`` as a Markdown table, its lines joined by newlines (no newline at the end).

    Args:
        rows: mappings of column name to value, or a pandas DataFrame.
        columns: the columns in order; by default the first row's keys (a DataFrame's columns).
        index: a DataFrame's index becomes the first column, headed by the index's name.
        floatfmt: the format spec of float cells (tabulate's default ``"g"``: 6 significant digits).
        align: one letter per column, ``l`` (left), ``r`` (right) or ``-`` (Markdown's default); by
            default ``r`` for a column whose cells are all numbers (or empty) and ``-`` for the others.
        pad: pad each column to its widest cell so that the table also reads as plain text; without,
            each row is as short as its cells (one line per row for grep, and diffs that stay local).
    """
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a DataFrame, without importing pandas
        frame = rows.reset_index() if index else rows
        if index and rows.index.name is None:
            frame = frame.rename(columns={"index": ""})
        columns = list(frame.columns) if columns is None else ([frame.columns[0], *columns] if index else columns)
        rows = frame.to_dict("records")
    rows = list(rows)
    if columns is None:
        columns = list(rows[0]) if rows else []
    columns = [str(c) for c in columns]
    values = [[row.get(c) for c in columns] for row in rows]
    cells = [[format_cell(v, floatfmt) for v in line] for line in values]
    if align is None:
        align = "".join("r" if values and all(_is_number(line[i]) or line[i] is None for line in values)
                        and any(line[i] is not None for line in values) else "-" for i in range(len(columns)))
    if len(align) != len(columns) or set(align) - set("lr-"):
        raise ValueError(f"align needs one of l, r, - per column ({len(columns)}), got {align!r}")
    header = [c.replace("|", "\\|") for c in columns]
    if pad:
        widths = [max(len(h), *(len(line[i]) for line in cells), 1) for i, h in enumerate(header)]
    else:
        widths = [1] * len(columns)

    def line(texts: Sequence[str]) -> str:
        if not pad:
            return "| " + " | ".join(texts) + " |"
        return "| " + " | ".join(t.rjust(w) if a == "r" else t.ljust(w)
                                 for t, w, a in zip(texts, widths, align)) + " |"

    def rule(a: str, w: int) -> str:
        dashes = "-" * (w + 2 - (a != "-") if pad else 3)
        return {"l": ":" + dashes, "r": dashes + ":", "-": dashes}[a]

    separator = "|" + "|".join(rule(a, w) for a, w in zip(align, widths)) + "|"
    return "\n".join([line(header), separator, *(line(c) for c in cells)])

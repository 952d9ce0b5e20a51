"""Plain-text and Markdown tables of evaluation results.

Cell formatting rules (the same for both table styles):

- Percent columns: a column whose name (case-insensitive) ends with "acc", is one of many,
  medium, few, all, top1, top5, or starts with "R@" holds fractions in [0, 1]; they are shown as
  percentages with 1 decimal (0.7234 -> "72.3").
- Other floats are shown with 4 significant digits; ints and strings as they are.
- A list/tuple of numbers (one per seed) is shown as "mean ± std" (sample std, ddof=1; a single
  value is shown alone). A NaN among them makes the whole cell "-".
- A missing key, None or NaN is shown as "-".
- Text columns are left-aligned, numeric columns right-aligned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real

import numpy as np
import torch

PERCENT_COLUMNS = frozenset({"many", "medium", "few", "all", "top1", "top5"})
MISSING = "-"


def is_percent_column(name: str) -> bool:
    """Whether the fractions of column name are shown as percentages (see the module rules)."""
    low = name.lower()
    return low.endswith("acc") or low in PERCENT_COLUMNS or name.startswith("R@")


def _scalar(v: object, column: str) -> object:
    # Tensors and numpy values become plain Python values, so one set of rules applies.
    if isinstance(v, torch.Tensor):
        v = v.item() if v.dim() == 0 else v.tolist()
    elif isinstance(v, np.ndarray):
        v = v.item() if v.ndim == 0 else v.tolist()
    elif isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, Mapping):
        raise TypeError(f"column {column!r} holds a dict; a cell must be a number, list or str")
    return v


def _number(x: float, percent: bool) -> str:
    return f"{100 * x:.1f}" if percent else f"{x:.4g}"


def format_cell(value: object, column: str) -> tuple[str, bool]:
    """The text of one cell and whether it is numeric (for alignment)."""
    v = _scalar(value, column)
    percent = is_percent_column(column)
    if v is None:
        return MISSING, True
    if isinstance(v, str):
        return v, False
    if isinstance(v, bool):
        return str(v), False
    if isinstance(v, Integral):
        return str(v), True
    if isinstance(v, Real):
        return (MISSING if math.isnan(v) else _number(float(v), percent)), True
    if isinstance(v, Sequence):
        xs = [_scalar(x, column) for x in v]
        if not xs or not all(isinstance(x, Real) and not isinstance(x, bool) for x in xs):
            raise TypeError(f"column {column!r} holds a list that is not all numbers: {v!r}")
        arr = np.asarray(xs, dtype=np.float64)
        if np.isnan(arr).any():
            return MISSING, True
        if arr.size == 1:
            return _number(float(arr[0]), percent), True
        mean, std = float(arr.mean()), float(arr.std(ddof=1))
        return f"{_number(mean, percent)} ± {_number(std, percent)}", True
    raise TypeError(f"column {column!r} holds a {type(v).__name__}, which cannot be formatted")


def _cells(rows: object, columns: object) -> tuple[list[str], list[list[str]], list[bool]]:
    """Header, formatted body and per-column right-alignment flags."""
    if isinstance(columns, str) or not isinstance(columns, Sequence) or not columns:
        raise TypeError(f"columns must be a non-empty list of str, got {columns!r}")
    if not all(isinstance(c, str) for c in columns):
        raise TypeError(f"columns must be a non-empty list of str, got {columns!r}")
    if not isinstance(rows, Sequence) or not all(isinstance(r, Mapping) for r in rows):
        raise TypeError(f"rows must be a list of dicts, got {type(rows).__name__}")
    body = []
    numeric = [True] * len(columns)
    for row in rows:
        line = []
        for j, col in enumerate(columns):
            text, is_num = format_cell(row.get(col), col)
            numeric[j] &= is_num
            line.append(text)
        body.append(line)
    # A column of nothing but "-" stays right-aligned like the numbers it stands for; a text
    # column is left-aligned.
    return list(columns), body, numeric


def format_table(rows: list[dict], columns: list[str], title: str | None = None) -> str:
    """A plain-text table with aligned columns of rows (dicts keyed by column name), in the
    order of columns, optionally preceded by a title line; see the module docstring for the
    cell rules."""
    header, body, right = _cells(rows, columns)
    widths = [max(len(r[j]) for r in [header, *body]) for j in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)
        ).rstrip()

    out = [] if title is None else [title]
    out += [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in body]
    return "\n".join(out)


def to_markdown(rows: list[dict], columns: list[str], align: bool = True) -> str:
    """A Markdown (GitHub) table of rows (dicts keyed by column name) in the order of columns;
    see the module docstring for the cell rules. The project's one Markdown table writer; align
    False writes a plain `---` rule (no alignment marks)."""
    header, body, right = _cells(rows, columns)

    def line(cells: list[str]) -> str:
        # A literal "|" would end the cell.
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    marks = ("---:" if r else ":---" for r in right) if align else ("---" for _ in right)
    rule = "|" + "|".join(marks) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def compare_methods(
    results: dict[str, dict],
    columns: Sequence[str] = ("many", "medium", "few", "all"),
    title: str | None = None,
    markdown: bool = False,
) -> str:
    """One table comparing methods: results maps a method name to its metrics dict (e.g. the
    output of long_tail_accuracy); rows follow the insertion order of results and the first
    column is "method". Plain text, or Markdown when markdown is True (then title is a bold
    line above the table)."""
    if not isinstance(results, Mapping):
        raise TypeError(f"results must be a dict of method name -> metrics dict, got {results!r}")
    for name, res in results.items():
        if not isinstance(res, Mapping):
            raise TypeError(
                f"results[{name!r}] must be a dict of metrics, got {type(res).__name__}"
            )
    if isinstance(columns, str) or not isinstance(columns, Sequence):
        raise TypeError(f"columns must be a sequence of column names, got {columns!r}")
    rows = [{**res, "method": str(name)} for name, res in results.items()]
    cols = ["method", *columns]
    if markdown:
        table = to_markdown(rows, cols)
        return table if title is None else f"**{title}**\n\n{table}"
    return format_table(rows, cols, title)

"""Markdown text of the report (compact tables, overview) and the rows of summary.csv."""

from __future__ import annotations

import statistics

from fedsim.report.data import (
    Axis,
    Record,
    Table,
    compact_table,
    fmt_stat,
    ident,
    is_number,
    metric_words,
    seeds_note,
    slices,
    split_by,
    stat_of,
    swept_axes,
)

SUMMARY_METRICS = (
    "final_test_accuracy",
    "best_test_accuracy",
    "final_attack_success_rate",
    "peak_attack_success_rate",
    "final_malicious_weight",
    "final_test_loss",
)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def table_markdown(table: Table) -> str:
    """A Table as a markdown table; the corner names the row and column axes."""
    corner = " \\ ".join(a.key for a in (table.rows, table.cols) if a) or ""
    lines = [_md_row([corner, *table.col_labels()]), "|" + "---|" * (1 + len(table.col_labels()))]
    for label, cells in zip(table.row_labels(), table.cells, strict=True):
        lines.append(_md_row([label, *(fmt_stat(c) for c in cells)]))
    return "\n".join(lines) + "\n"


def metrics_markdown(records: list[Record], metrics: list[str], rows: Axis | None) -> str:
    """One axis (or none): rows are its values, columns the metrics."""
    stats = [[stat_of(cell, m) for m in metrics] for cell in split_by(records, rows)]
    labels = rows.labels if rows else ["all runs"]
    lines = [
        _md_row([rows.key if rows else "", *(metric_words(m) for m in metrics)]),
        "|" + "---|" * (1 + len(metrics)),
    ]
    lines += [
        _md_row([lab, *(fmt_stat(s) for s in row)]) for lab, row in zip(labels, stats, strict=True)
    ]
    return "\n".join(lines) + "\n"


def _pair_note(table: Table) -> str:
    """``rows aggregator, columns attack; mean ± std over 2 seeds (pooled over x)``."""
    axes = [f"{w} `{a.key}`" for w, a in (("rows", table.rows), ("columns", table.cols)) if a]
    note = ", ".join(axes) + "; " if axes else ""
    note += f"mean ± std over {table.seeds} (population std)"
    return note + (f", pooled over {', '.join(table.pooled)}" if table.pooled else "")


def tables_markdown(
    records: list[Record],
    metrics: list[str],
    rows: Axis | None,
    cols: Axis | None,
    level: int = 2,
) -> str:
    """The compact tables: per metric, ``rows`` x ``cols`` (split by the other axes when
    they make at most ``MAX_SLICES`` slices); with fewer than two axes one table of every
    metric."""
    if rows is None or cols is None:
        note = f"mean ± std over {seeds_note(records)} (population std)"
        return metrics_markdown(records, metrics, rows or cols) + f"\n{note}\n"
    others = [a.key for a in swept_axes(records) if a.key not in (rows.key, cols.key)]
    parts = []
    for metric in metrics:
        parts.append(f"{'#' * level} {metric_words(metric)}\n")
        for title, members in slices(records, others):
            table = compact_table(members, metric, rows, cols)
            head = f"{title}: " if title else ""
            parts.append(f"{head}{_pair_note(table)}\n\n{table_markdown(table)}")
    return "\n".join(parts)


def overview_markdown(records: list[Record], dirs) -> str:
    """Where the runs come from, how many, and the swept axes with their labels."""
    settings = len({ident(r.point) for r in records})
    where = ", ".join(f"`{d}`" for d in dirs)
    plural = "s" if settings != 1 else ""
    lines = [
        f"{len(records)} runs from {where}: {settings} setting{plural}, {seeds_note(records)} each."
    ]
    for a in swept_axes(records):
        shown = ", ".join(a.labels[:12]) + (", …" if len(a.labels) > 12 else "")
        lines.append(f"- `{a.key}` ({len(a.values)} values): {shown}")
    return "\n".join(lines) + "\n"


def _sort_key(v):
    return (0, float(v), "") if isinstance(v, int | float) else (1, 0.0, str(v))


def axes_of(points: list[dict]) -> list[str]:
    """Flattened swept keys (other than seed) taking at least two values, in first-seen
    order: the columns that tell settings apart in ``summary.csv``."""
    keys: list[str] = []
    for p in points:
        keys.extend(k for k in p if k not in keys and k != "seed")
    return [k for k in keys if len({repr(p.get(k)) for p in points}) > 1]


def _mean_std(values):
    vals = [float(v) for v in values if is_number(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.pstdev(vals)


def summary_rows(rows: list[dict], axes: list[str]) -> list[dict]:
    """Mean and std over seeds of every final_/best_ metric, one row per setting."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(repr(row.get(a)) for a in axes), []).append(row)
    present = {k for r in rows for k in r}
    metrics = [m for m in SUMMARY_METRICS if m in present]
    out = []
    for members in groups.values():
        s = {a: members[0].get(a) for a in axes}
        s["n_seeds"] = len(members)
        for m in metrics:
            mean, std = _mean_std([r.get(m) for r in members])
            if mean is not None:
                s[f"{m}_mean"], s[f"{m}_std"] = mean, std
        s["diverged"] = sum(bool(r.get("diverged")) for r in members)
        out.append(s)
    out.sort(key=lambda s: tuple(_sort_key(s[a]) for a in axes))
    return out

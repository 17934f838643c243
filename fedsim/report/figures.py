"""Matplotlib figures of the report, built without pyplot (``Figure`` objects a test can
inspect), and ``save_figure`` to write one as a small PNG."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

from fedsim.report.data import (
    ConflictPoint,
    Record,
    Series,
    Stat,
    Table,
    axis_of,
    curve_series,
    metric_range,
    metric_unit,
    metric_words,
    seeds_note,
    swept_axes,
)

DPI = 100
MAX_LINES = 8  # lines per curve panel; more settings split into small multiples


def _figure(width: float, height: float):
    """A matplotlib Figure without pyplot (no global state, nothing to close)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``DPI``, reduced to a 256-colour palette (about a quarter
    of the bytes; plots have few colours); returns ``path``."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    image = Image.open(buf).convert("RGB")
    small = image.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    small.save(path, format="png", optimize=True)
    return Path(path)


def _colour(i: int):
    """The i-th line colour (tab10, then tab20 past ten lines)."""
    import matplotlib

    return matplotlib.colormaps["tab10" if i < 10 else "tab20"].colors[i % 20]


def _metric_axis_label(metric: str) -> str:
    unit = metric_unit(metric)
    return metric_words(metric) + (f" ({unit})" if unit else "")


def _panel_key(series: list[Series], keys: list[str]) -> str | None:
    """The key whose values split ``series`` into the fewest panels of at most
    ``MAX_LINES`` lines (or, if none does, the key with the most values)."""
    if len(series) <= MAX_LINES or len(keys) < 2:
        return None

    def cost(key):
        counts = Counter(s.parts[key] for s in series)
        fits = max(counts.values()) <= MAX_LINES
        return (0, len(counts)) if fits else (1, -len(counts))

    return min(keys, key=cost)


def panel_split(
    series: list[Series], keys: list[str], panel: str | None = None
) -> tuple[str | None, list[tuple[str, list[Series]]]]:
    """Small multiples: ``(panel key, [(panel title, series)])``. Split by ``panel`` (or a
    key chosen by ``_panel_key`` past ``MAX_LINES`` lines), then into chunks of at most
    ``MAX_LINES`` lines."""
    panel = panel or _panel_key(series, keys)
    groups: dict[str, list[Series]] = {}
    for s in series:
        groups.setdefault(f"{panel} = {s.parts[panel]}" if panel else "", []).append(s)
    out = []
    for title, members in groups.items():
        chunks = [members[i : i + MAX_LINES] for i in range(0, len(members), MAX_LINES)]
        for j, chunk in enumerate(chunks):
            more = f" ({j + 1}/{len(chunks)})" if len(chunks) > 1 else ""
            out.append(((title + more).strip(), chunk))
    return panel, out


def _line_label(s: Series, keys: list[str]) -> str:
    return ", ".join(s.parts[k] for k in keys) or "all runs"


def _curve_title(records: list[Record], metric: str, pooled: list[str]) -> str:
    seeds = seeds_note(records)
    spread = f"mean ± std band over {seeds}" if not seeds.startswith("1 seed") else "1 seed"
    pool = f"; pooled over {', '.join(pooled)}" if pooled else ""
    return f"{metric_words(metric)} over rounds\n{spread}{pool}"


def curve_figure(
    records: list[Record], metric: str, keys: list[str] | None = None, panel: str | None = None
):
    """A per-evaluation ``metric`` over rounds: one line per combination of ``keys``
    (default: every swept axis), mean over runs with a ± std band when there are several;
    small multiples by ``panel`` or past ``MAX_LINES`` lines. Returns the Figure."""
    axes = swept_axes(records) if keys is None else [axis_of(records, k) for k in keys]
    if panel is not None and panel not in [a.key for a in axes]:
        axes.append(axis_of(records, panel))
    series = curve_series(records, metric, axes)
    panel, panels = panel_split(series, [a.key for a in axes], panel)
    line_keys = [a.key for a in axes if a.key != panel]
    pooled = [a.key for a in swept_axes(records) if a.key not in [b.key for b in axes]]
    colours = {
        lab: _colour(i)
        for i, lab in enumerate(dict.fromkeys(_line_label(s, line_keys) for s in series))
    }
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    legend_width = 2.2 if len(panels) > 1 else 0.0
    fig = _figure(4.6 * ncols + legend_width, 3.3 * nrows + 0.7)
    grid = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    handles: dict[str, Any] = {}
    for ax, (title, members) in zip(grid.flat, panels, strict=False):
        _draw_panel(ax, members, line_keys, colours, handles, metric)
        ax.set_title(title, fontsize=9)
    for ax in list(grid.flat)[len(panels) :]:
        ax.remove()
    for col in range(ncols):  # the lowest panel of each column carries the round axis
        ax = grid[(len(panels) - 1 - col) // ncols, col]
        ax.set_xlabel("round")
        ax.xaxis.set_tick_params(labelbottom=True)
    for ax in grid[:, 0]:
        ax.set_ylabel(_metric_axis_label(metric), fontsize=9)
    legend = dict(title=", ".join(line_keys) or None, fontsize=7, title_fontsize=7)
    if len(panels) > 1:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", **legend)
    else:
        grid[0, 0].legend(**legend)
    fig.suptitle(_curve_title(records, metric, pooled), fontsize=10)
    return fig


def _draw_panel(ax, members: list[Series], line_keys, colours, handles, metric) -> None:
    """Lines (and ± std bands) of one panel; series without values become a legend entry
    with the reason, or a note in the middle of an otherwise empty panel."""
    empty = all(not s.rounds for s in members)
    for s in members:
        label = _line_label(s, line_keys)
        if not s.rounds:
            note = f"{label}: {s.reason}"
            (mark,) = ax.plot([], [], ls="none", label=note)
            if not empty:
                handles.setdefault(note, mark)
            continue
        (line,) = ax.plot(
            s.rounds, s.mean, marker="o", ms=3, lw=1.4, color=colours[label], label=label
        )
        handles.setdefault(label, line)
        if s.n > 1:
            lo = [m - d for m, d in zip(s.mean, s.std, strict=True)]
            hi = [m + d for m, d in zip(s.mean, s.std, strict=True)]
            ax.fill_between(s.rounds, lo, hi, color=colours[label], alpha=0.18, lw=0)
    if empty:
        reasons = ", ".join(dict.fromkeys(s.reason for s in members))
        ax.text(0.5, 0.5, reasons, ha="center", va="center", transform=ax.transAxes, color="0.4")
    rng = metric_range(metric)
    if rng is not None:
        ax.set_ylim(rng[0] - 0.03, rng[1] + 0.03)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=8)


def _colour_range(table: Table) -> tuple[float, float]:
    """The metric's fixed range (0–1 for rates), else the finite cell means' range."""
    rng = metric_range(table.metric)
    if rng is not None:
        return rng
    means = [c.mean for row in table.cells for c in row if c.mean is not None]
    if not means:
        return 0.0, 1.0
    lo, hi = min(means), max(means)
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def heatmap_figure(table: Table):
    """A Table as a heatmap: each cell's mean (± std with several seeds) written in it, a
    colour scale fixed to the metric's range, empty cells grey with their reason."""
    import numpy as np

    rows, cols = table.row_labels(), table.col_labels()
    grid = np.array([[np.nan if c.mean is None else c.mean for c in r] for r in table.cells])
    lo, hi = _colour_range(table)
    fig = _figure(max(4.8, 1.15 * len(cols) + 3.2), max(3.0, 0.5 * len(rows) + 2.0))
    ax = fig.subplots()
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e4e4e4")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=25, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i, j in itertools.product(range(len(rows)), range(len(cols))):
        _cell_text(ax, i, j, table.cells[i][j], (lo, hi))
    ax.set_xlabel(table.cols.key if table.cols else "")
    ax.set_ylabel(table.rows.key if table.rows else "")
    fig.colorbar(image, ax=ax, label=_metric_axis_label(table.metric))
    pool = f"; pooled over {', '.join(table.pooled)}" if table.pooled else ""
    spread = "mean ± std" if not table.seeds.startswith("1 seed") else "value"
    fig.suptitle(f"{metric_words(table.metric)}\n{spread} over {table.seeds}{pool}", fontsize=10)
    return fig


def _cell_text(ax, i: int, j: int, stat: Stat, rng: tuple[float, float]) -> None:
    if stat.mean is None:
        ax.text(
            j, i, stat.reason, ha="center", va="center", fontsize=7, color="0.35", style="italic"
        )
        return
    text = f"{stat.mean:.2f}" + (f"\n±{stat.std:.2f}" if stat.n > 1 else "")
    light = (stat.mean - rng[0]) / (rng[1] - rng[0]) > 0.6
    ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if light else "white")


def conflict_figure(
    points: dict[str, list[ConflictPoint]],
    knob: str,
    seeds: str = "",
    groups: str = "",
    x: str = "final_honest_weight",
):
    """The conflict curve, two panels sharing the x axis ``x`` (how much of the honest
    clients the rule used): final attack success rate, and final test accuracy; one line
    per group (legend titled ``groups``), points labelled with their knob value, error
    bars where points pool several runs."""
    fig = _figure(12.0, 5.0)
    success, accuracy = fig.subplots(1, 2, sharex=True)
    for i, (group, pts) in enumerate(points.items()):
        style = dict(marker="o", ms=4, capsize=2, lw=1.4, color=_colour(i), label=group)
        _conflict_line(success, pts, "attack_success", style, labels=True)
        _conflict_line(accuracy, pts, "accuracy", style, labels=False)
    for ax, metric in ((success, "final_attack_success_rate"), (accuracy, "final_test_accuracy")):
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel(_metric_axis_label(x))
        ax.set_ylabel(_metric_axis_label(metric))
        ax.grid(alpha=0.3)
    fig.legend(
        *success.get_legend_handles_labels(),
        loc="outside right upper",
        fontsize=7,
        title=groups or None,
        title_fontsize=7,
    )
    spread = f"mean ± std over {seeds}" if seeds and not seeds.startswith("1 seed") else seeds
    knobs = ", ".join(knob.split(","))
    title = f"attack success and accuracy vs {metric_words(x)}\nalong {knobs}; {spread}"
    fig.suptitle(title, fontsize=10)
    return fig


def _conflict_line(ax, pts: list[ConflictPoint], field: str, style: dict, labels: bool) -> None:
    """One group's points (``field``: attack_success or accuracy) against their ``x``."""
    kept = [p for p in pts if getattr(p, field).mean is not None]
    xs = [p.x.mean for p in kept]
    ys = [getattr(p, field).mean for p in kept]
    xerr = [p.x.std if p.x.n > 1 else 0.0 for p in kept]
    yerr = [getattr(p, field).std if getattr(p, field).n > 1 else 0.0 for p in kept]
    ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, **style)
    for p, xv, yv in zip(kept, xs, ys, strict=True) if labels else ():
        ax.annotate(p.label, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)


def _x_positions(table: Table) -> tuple[list[float], bool]:
    """Column positions: the values themselves when every one is a number, else 0..n-1."""
    values = table.cols.values if table.cols else [0]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    return ([float(v) for v in values] if numeric else list(range(len(values)))), numeric


def along_figure(tables: list[Table]):
    """Final metrics against a swept axis: one panel per Table (its columns the x axis,
    shared), one line per row value with ± std error bars where cells pool several runs;
    a log x axis for numeric values spanning more than a factor of 20."""
    fig = _figure(4.4 * len(tables) + 2.2, 3.8)
    axes = fig.subplots(1, len(tables), squeeze=False)[0]
    for ax, table in zip(axes, tables, strict=True):
        xs, numeric = _x_positions(table)
        for i, (label, row) in enumerate(zip(table.row_labels(), table.cells, strict=True)):
            kept = [(x, c) for x, c in zip(xs, row, strict=True) if c.mean is not None]
            errs = [c.std if c.n > 1 else 0.0 for _, c in kept]
            ax.errorbar(
                [x for x, _ in kept],
                [c.mean for _, c in kept],
                yerr=errs,
                marker="o",
                ms=4,
                capsize=2,
                lw=1.4,
                ls="-" if numeric else ":",
                color=_colour(i),
                label=label,
            )
        if numeric and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(xs, table.col_labels(), rotation=25, ha="right", fontsize=7)
        rng = metric_range(table.metric)
        if rng is not None:
            ax.set_ylim(rng[0] - 0.03, rng[1] + 0.03)
        ax.set_xlabel(table.cols.key if table.cols else "")
        ax.set_ylabel(_metric_axis_label(table.metric), fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    first = tables[0]
    title = first.rows.key if first.rows else None
    fig.legend(
        *axes[0].get_legend_handles_labels(),
        loc="outside right upper",
        fontsize=7,
        title=title,
        title_fontsize=7,
    )
    pool = f"; pooled over {', '.join(first.pooled)}" if first.pooled else ""
    spread = "mean ± std" if not first.seeds.startswith("1 seed") else "value"
    fig.suptitle(
        f"final metrics along {first.cols.key if first.cols else ''}\n"
        f"{spread} over {first.seeds}{pool}",
        fontsize=10,
    )
    return fig

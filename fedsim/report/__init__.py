"""Figures and tables of finished sweeps (``fedsim report DIR [DIR ...]``).

Reads every finished run under the given sweep folders (shards written to several
folders, or into one, merge here; a run id seen twice counts once) and writes to ``out``:

- ``REPORT.md``: what was swept, the compact tables, and every figure with a caption;
- ``summary.md``: one compact table per metric that matters (final test accuracy, final
  attack success rate, final malicious weight): rows one swept axis, columns another,
  cells ``mean ± std`` over seeds;
- ``results.csv`` (one row per run) and ``summary.csv`` (one row per setting: mean and
  std over seeds of every final metric), for machines;
- ``curves_<metric>.png``: a metric over rounds, one line per setting (mean, with a ± std
  band over seeds), small multiples past ``MAX_LINES`` lines;
- ``heatmap_<metric>__<rows>__<cols>.png``: a final metric over two swept axes;
- ``conflict_<knob>.png`` (with ``conflict=KNOB``): final attack success rate and final
  test accuracy against final honest weight (``conflict_<knob>__<x>.png`` against another
  ``conflict_x`` metric, e.g. ``final_honest_accepted``), one line per group, along a
  tightness knob;
- ``along_<key>[__<slice>].png`` (with ``along``): final metrics against a swept axis, one
  line per value of another, one figure per slice of the remaining axes.

Derived metrics (``fedsim.report.derived``): a sweep with local-only runs (``topology:
isolated``) gives every other run its ``collaboration_gain``; a swept
``client.participants`` gives ``malicious_share`` per evaluation.

An *axis* is a key the user swept (a swept mapping such as ``attack: [{name: none}, ...]``
is one axis, its values labelled ``label_of(value)``), or a dotted path into a swept
mapping (``aggregator.beta``) when named explicitly. Metrics a run lacks (the attack
success rate of ``attack: none``) leave a cell empty with the reason ("no target").
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from pathlib import Path
from typing import Any

from fedsim.io import write_atomic
from fedsim.registry import ConfigError
from fedsim.report.data import (
    TABLE_METRICS,
    Axis,
    Record,
    axis_of,
    check_key,
    check_metric,
    compact_table,
    conflict_points,
    default_pair,
    eval_metric,
    is_number,
    key_choices,
    metric_words,
    record_of,
    run_metric,
    seeds_note,
    slices,
    swept_axes,
    table_metrics,
)
from fedsim.report.derived import derive
from fedsim.report.figures import (
    along_figure,
    conflict_figure,
    curve_figure,
    heatmap_figure,
    save_figure,
)
from fedsim.report.tables import axes_of, overview_markdown, summary_rows, tables_markdown
from fedsim.sweep import _flatten, load_runs, point_of, row_of, to_csv, write_results

CURVE_METRICS = ("test_accuracy", "attack_success_rate", "malicious_weight", "test_loss")
MAX_HEATMAPS = 6
PROGRESS_MIN_RUNS = 200


@dataclasses.dataclass
class Extras:
    """What a report adds to its defaults (the paper's experiments set these): conflict
    curves against each of ``conflict_x``; ``along`` figures, each a mapping of
    ``along_plots``' arguments (``x``, ``lines``, ``metrics``); curves over rounds of
    ``curves`` (instead of the default ones); table ``metrics`` (per-evaluation names,
    their final values)."""

    conflict_x: tuple = ("final_honest_weight",)
    along: tuple = ()
    curves: tuple = ()
    metrics: tuple = ()


@dataclasses.dataclass
class Plot:
    """A figure to write: file name, caption, and a function that builds the Figure."""

    name: str
    caption: str
    build: Any


def _bar(total: int, desc: str, unit: str, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not show, file=sys.stderr, leave=False)


def load_records(dirs, progress: bool = False) -> tuple[list[dict], list[Record]]:
    """The finished runs under ``dirs`` (see ``load_runs``) and their Records; a progress
    line on stderr when ``progress`` and there are ``PROGRESS_MIN_RUNS`` runs or more."""
    total = sum(1 for d in dirs for _ in (Path(d) / "runs").glob("*"))
    with _bar(total, "report: reading runs", "run", progress and total >= PROGRESS_MIN_RUNS) as bar:
        runs = load_runs(dirs, on_run=lambda: bar.update(1))
    return runs, derive([record_of(r) for r in runs])


def _has_curve(records: list[Record], metric: str) -> bool:
    return any(is_number(rec.get(metric)) for r in records for rec in r.history)


def curve_plots(records, metric=None, x=None, y=None) -> list[Plot]:
    """Curves of ``metric`` (default: ``CURVE_METRICS`` that some run records): lines by
    ``x`` (default: every swept axis but ``y``), panels by ``y``."""
    names = [eval_metric(metric)] if metric else list(CURVE_METRICS)
    keys = [x] if x else [a.key for a in swept_axes(records) if a.key != y] if y else None
    lines = ", ".join(keys if keys is not None else [a.key for a in swept_axes(records)])
    plots = []
    for m in (m for m in names if _has_curve(records, m)):
        caption = f"{metric_words(m)} over rounds, one line per {lines or 'sweep'}"
        caption += f", one panel per {y}" if y else ""
        build = lambda m=m: curve_figure(records, m, keys, y)
        plots.append(Plot(f"curves_{m}.png", caption, build))
    return plots


def heatmap_pairs(records: list[Record], x=None, y=None) -> list[tuple[Axis, Axis]]:
    """(rows, cols) pairs: ``(y, x)`` when both are named; one named key against every
    other axis; else every pair of swept axes that cross (more combinations present than
    either has values, so not zipped), rows the axis with more values."""
    axes = swept_axes(records)
    if x and y:
        return [(axis_of(records, y), axis_of(records, x))]
    if x or y:
        fixed = axis_of(records, x or y)
        others = [a for a in axes if a.key != fixed.key]
        return [(fixed, a) if y else (a, fixed) for a in others]
    pairs = []
    for a, b in itertools.combinations(axes, 2):
        combos = {(a.index(r.point), b.index(r.point)) for r in records}
        if len(combos) > max(len(a.values), len(b.values)):
            pairs.append((b, a) if len(b.values) > len(a.values) else (a, b))
    return pairs


def _safe(text: str) -> str:
    return "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "._-" else "_" for ch in text)


def heatmap_plots(records, metric=None, x=None, y=None) -> list[Plot]:
    """Heatmaps of ``metric`` (default: final test accuracy, and final attack success rate
    when some run has one) over ``heatmap_pairs``, at most ``MAX_HEATMAPS``."""
    if metric:
        metrics = [run_metric(metric)]
    else:
        metrics = [
            m for m in TABLE_METRICS[:2] if any(is_number(r.metrics.get(m)) for r in records)
        ]
    plots = []
    for rows, cols in heatmap_pairs(records, x, y):
        for m in metrics:
            name = f"heatmap_{m}__{_safe(rows.key)}__{_safe(cols.key)}.png"
            caption = f"{metric_words(m)} over {rows.key} (rows) × {cols.key} (columns)"
            build = lambda m=m, a=rows, b=cols: heatmap_figure(compact_table(records, m, a, b))
            plots.append(Plot(name, caption, build))
    return plots[:MAX_HEATMAPS]


def conflict_plot(records: list[Record], knob: str, x: str = "final_honest_weight") -> Plot:
    """The conflict curve along ``knob`` (comma-separated keys; those no run has are
    skipped) against ``x``; ConfigError if no key is swept or no run gives it a point."""
    named = [k.strip() for k in knob.split(",")]
    knobs = [k for k in named if k in key_choices(records)]
    knobs = knobs or [check_key(records, named[0], "--conflict")]
    points = conflict_points(records, knobs, x=x)
    if not points:
        raise ConfigError(
            f"--conflict {knob}: no run with that knob has both a final attack success rate "
            f"and a {metric_words(x)} (a targeted attack is needed)"
        )
    groups = ", ".join(a.key for a in swept_axes(records) if a.key not in knobs)
    caption = f"final attack success rate and test accuracy vs {metric_words(x)} along {knob}"
    caption += f", one line per {groups}" if groups else ""
    suffix = "" if x == "final_honest_weight" else f"__{_safe(x)}"
    name = f"conflict_{_safe(knob)}{suffix}.png"
    seeds = seeds_note(records)
    return Plot(name, caption, lambda: conflict_figure(points, knob, seeds, groups, x))


ALONG_METRICS = ("attack_success_rate", "test_accuracy")


def along_plots(records: list[Record], x: str, lines=None, metrics=ALONG_METRICS) -> list[Plot]:
    """Final ``metrics`` (those some run has) against the swept axis ``x``, one line per
    value of ``lines`` (or one line), one figure per slice of the other swept axes (or
    one pooling them, past ``MAX_SLICES`` slices)."""
    cols = axis_of(records, check_key(records, x, "along"))
    rows = axis_of(records, check_key(records, lines, "along lines")) if lines else None
    names = [run_metric(m) for m in metrics]
    names = [m for m in names if any(is_number(r.metrics.get(m)) for r in records)]
    others = [a.key for a in swept_axes(records) if a.key not in (x, lines)]
    plots = []
    for title, members in slices(records, others) if names else ():
        tables = [compact_table(members, m, rows, cols) for m in names]
        words = ", ".join(metric_words(m) for m in names)
        caption = f"{words} against {x}" + (f", one line per {lines}" if lines else "")
        caption += f" ({title})" if title else ""
        name = f"along_{_safe(x)}" + (f"__{_safe(title)}" if title else "") + ".png"
        plots.append(Plot(name, caption, lambda t=tables: along_figure(t)))
    return plots


def _markdown_files(records, dirs, metrics, pair, plots) -> tuple[str, str]:
    """The text of summary.md and REPORT.md."""
    overview = overview_markdown(records, dirs)
    tables = tables_markdown(records, metrics, *pair) if metrics else "(no metrics)\n"
    sections = tables_markdown(records, metrics, *pair, level=3) if metrics else tables
    machines = (
        "For machines: `summary.csv` (one row per setting: mean and std over seeds of every "
        "final metric, swept mappings as dotted columns) and `results.csv` (one row per run)."
    )
    summary = f"# Sweep summary\n\n{overview}\n{tables}\n{machines}\n"
    figures = "\n".join(f"### {p.caption}\n\n![{p.caption}]({p.name})\n" for p in plots)
    report = (
        f"# Sweep report\n\n{overview}\nTables: [summary.md](summary.md). {machines}\n\n"
        f"## Tables\n\n{sections}\n## Figures\n\n{figures or '(none)'}\n"
    )
    return summary, report


def make_report(
    dirs,
    out,
    x=None,
    y=None,
    metric=None,
    conflict=None,
    progress: bool = False,
    extra: Extras | None = None,
) -> list[Path]:
    """Write the tables, figures and REPORT.md of the sweep folders ``dirs`` into ``out``
    (see the module docstring); returns the files written. ``x``/``y``: swept keys for the
    heatmap columns/rows, the table columns/rows and the curves' lines/panels; ``metric``:
    the one metric to plot; ``conflict``: knob key(s) of a conflict curve; ``extra``: more
    figures and table metrics (``Extras``). Unknown keys or metrics, or no finished runs,
    raise a one-line ConfigError before anything is written. ``progress``: progress lines
    on stderr for folders of ``PROGRESS_MIN_RUNS`` runs or more."""
    extra = extra or Extras()
    runs, records = load_records(dirs, progress)
    if not runs:
        raise ConfigError(f"no finished runs under {', '.join(str(d) for d in dirs)}")
    x = x and check_key(records, x, "--x")
    y = y and check_key(records, y, "--y")
    metric = metric and check_metric(records, metric)
    if x and x == y:
        raise ConfigError(f"--x and --y name the same key {x!r}")
    curves = [p for m in extra.curves for p in curve_plots(records, m, x, y)]
    plots = curves or curve_plots(records, metric, x, y)
    plots += heatmap_plots(records, metric, x, y)
    plots += [conflict_plot(records, conflict, cx) for cx in extra.conflict_x] if conflict else []
    plots += [p for a in extra.along for p in along_plots(records, **a)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row_of(r) for r in runs]
    written = write_results(out, rows)
    summary = summary_rows(rows, axes_of([_flatten(point_of(r["summary"])) for r in runs]))
    write_atomic(out / "summary.csv", to_csv(summary))
    written.append(out / "summary.csv")
    show = progress and len(runs) >= PROGRESS_MIN_RUNS
    with _bar(len(plots), "report: figures", "fig", show) as bar:
        for p in plots:
            written.append(save_figure(p.build(), out / p.name))
            bar.update(1)
    pair = _table_pair(records, x, y)
    metrics = table_metrics(records, metric) + [run_metric(m) for m in extra.metrics]
    summary_md, report_md = _markdown_files(
        records, dirs, list(dict.fromkeys(metrics)), pair, plots
    )
    write_atomic(out / "summary.md", summary_md)
    write_atomic(out / "REPORT.md", report_md)
    return written + [out / "summary.md", out / "REPORT.md"]


def _table_pair(records, x, y) -> tuple[Axis | None, Axis | None]:
    """(rows, cols) of the compact tables: ``y`` x ``x`` where named; an unnamed side is the
    remaining axis with the most values (``default_pair`` when neither is named)."""
    axes = swept_axes(records)
    if not x and not y:
        return default_pair(axes)
    longest = default_pair([a for a in axes if a.key not in (x, y)])[0]
    rows = axis_of(records, y) if y else longest
    cols = axis_of(records, x) if x else longest
    return rows, cols

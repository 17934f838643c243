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
- ``conflict_<knob>.png`` (with ``conflict=KNOB``): final attack success rate against
  final honest weight, one line per group, along a tightness knob.

An *axis* is a key the user swept (a swept mapping such as ``attack: [{name: none}, ...]``
is one axis, its values labelled ``label_of(value)``), or a dotted path into a swept
mapping (``aggregator.beta``) when named explicitly. Metrics a run lacks (the attack
success rate of ``attack: none``) leave a cell empty with the reason ("no target").
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from fedsim.io import write_atomic
from fedsim.registry import ConfigError
from fedsim.sweep import _flatten, load_runs, point_of, row_of, to_csv, write_results

CURVE_METRICS = ("test_accuracy", "attack_success_rate", "malicious_weight", "test_loss")
SUMMARY_METRICS = (
    "final_test_accuracy",
    "best_test_accuracy",
    "final_attack_success_rate",
    "peak_attack_success_rate",
    "final_malicious_weight",
    "final_test_loss",
)
TABLE_METRICS = ("final_test_accuracy", "final_attack_success_rate", "final_malicious_weight")
RUN_LEVEL = ("best_test_accuracy", "best_test_loss", "peak_attack_success_rate")
NOT_METRICS = ("round", "seconds", "finite")
MAX_HEATMAPS = 6
MAX_LINES = 8  # lines per curve panel; more settings split into small multiples
MAX_SLICES = 4  # tables split by the other axes up to this many slices, else pool them
PROGRESS_MIN_RUNS = 200
DPI = 100

# name -> (words, unit, value range or None)
METRIC_INFO = {
    "test_accuracy": ("test accuracy", "fraction correct", (0.0, 1.0)),
    "test_loss": ("test loss", "cross-entropy", None),
    "attack_success_rate": ("attack success rate", "fraction of targeted inputs", (0.0, 1.0)),
    "malicious_weight": ("malicious weight", "share of the aggregate", (0.0, 1.0)),
    "honest_weight": ("honest weight", "share of the aggregate", (0.0, 1.0)),
    "malicious_distance": ("malicious distance to the aggregate", "L2", None),
    "honest_distance": ("honest distance to the aggregate", "L2", None),
    "update_norm": ("update norm", "L2", None),
    "malicious_participants": ("malicious participants", "clients per round", None),
    "accuracy_drop": ("accuracy drop", "vs. the baseline run", None),
}
# why a run has no value of a metric it never records
ABSENT_REASON = {"attack_success_rate": "no target", "accuracy_drop": "no baseline"}


# ------------------------------------------------------------------------------ labels

GREEK = {
    "alpha": "α",
    "beta": "β",
    "gamma": "γ",
    "delta": "δ",
    "epsilon": "ε",
    "lambda": "λ",
    "mu": "μ",
    "nu": "ν",
    "rho": "ρ",
    "sigma": "σ",
    "tau": "τ",
    "kappa": "κ",
}


class _Missing:
    """A key a run's swept point does not have (e.g. ``attack.beta`` of ``{name: none}``)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


def _scalar_label(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _list_label(values) -> str:
    """``[0, 2, 3, 4, 5, 6, 8, 9]`` -> ``[0,2–6,8,9]``: runs of 3+ integers collapse."""
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "[" + ",".join(label_of(v) for v in values) + "]"
    parts, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            run = values[start:i]
            parts += [f"{run[0]}–{run[-1]}"] if len(run) >= 3 else [str(v) for v in run]
            start = i
    return "[" + ",".join(parts) + "]"


def _option_rank(key: str) -> tuple:
    """Label order of options: the goal, then source→target, the rest by name, fraction
    last (summary.json stores mappings with sorted keys, so dict order is not the user's)."""
    return ({"goal": 0, "source": 1}.get(key, 3 if key == "fraction" else 2), key)


def _option_parts(options: dict) -> list[str]:
    """A component's options as short label parts (see ``label_of``)."""
    parts = []
    pair = "source" in options and "target" in options
    for key in sorted(options, key=_option_rank):
        value = options[key]
        if value is None or (key == "target" and pair):
            continue
        if key == "source" and pair:
            parts.append(f"{label_of(value)}→{label_of(options['target'])}")
        elif key == "fraction" and isinstance(value, int | float):
            if value:
                parts.append(f"{100 * value:.3g}%")
        elif key == "goal":
            parts.append(_goal_label(value))
        else:
            parts.append(f"{GREEK.get(key, key)}={label_of(value)}")
    return parts


def _goal_label(goal) -> str:
    """An attack's goal: ``{name: targeted, source: 1, target: 7}`` -> ``1→7``."""
    if not isinstance(goal, dict):
        return label_of(goal)
    options = {k: v for k, v in goal.items() if k != "name"}
    parts = _option_parts(options)
    if goal.get("name") in ("targeted", None) and parts:
        return ", ".join(parts)
    return label_of(goal)


def label_of(value) -> str:
    """A swept value as a short readable label.

    Mappings with a ``name`` read as ``name(options)``: ``{name: trimmed_mean, beta: 0.1}``
    -> ``trimmed_mean(β=0.1)``, ``{name: krum, f: 10}`` -> ``krum(f=10)``, an attack
    ``{name: strategic_distance, goal: {name: targeted, source: 1, target: 7}, fraction:
    0.2}`` -> ``strategic_distance(1→7, 20%)``, ``{name: none}`` -> ``none``. Scalars read
    as they are (floats in ``%g``), integer lists compress runs (``[0–9]``)."""
    if value is MISSING:
        return "unset"
    if isinstance(value, dict):
        options = {k: v for k, v in value.items() if k != "name"}
        parts = _option_parts(options)
        if "name" not in value:
            return ", ".join(parts)
        return f"{value['name']}({', '.join(parts)})" if parts else str(value["name"])
    if isinstance(value, list | tuple):
        return _list_label(list(value))
    return _scalar_label(value)


def knob_label(key: str, value) -> str:
    """A knob's value named by the last part of its key: ``aggregator.beta`` -> ``β=0.1``."""
    name = key.rsplit(".", 1)[-1]
    return f"{GREEK.get(name, name)}={label_of(value)}"


def _natural(text: str) -> tuple:
    """Sort key that orders numbers inside labels by value (``f=5`` before ``f=10``)."""
    parts = re.split(r"(\d+(?:\.\d+)?)", text)
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts))


def _order(value) -> tuple:
    """Axis order: ``none`` first, numbers by value, the rest by natural label order."""
    if value is MISSING:
        return (3, 0.0, ())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (1, float(value), ())
    label = label_of(value)
    return (0, 0.0, ()) if label == "none" else (2, 0.0, _natural(label))


def _ident(value) -> str:
    """A hashable identity for a swept value (mappings and lists are not hashable)."""
    return "<missing>" if value is MISSING else json.dumps(value, sort_keys=True, default=str)


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass
class Record:
    """One finished run: its swept point (seed apart), run-level metrics, and history."""

    run_id: str
    point: dict  # swept key -> value, in sweep-file order, without "seed"
    seed: Any
    metrics: dict  # final_<m> (last evaluation), best_test_accuracy, ... -> value or None
    history: list[dict]
    diverged: bool = False


def record_of(run: dict) -> Record:
    """A run as ``load_runs`` returns it (``run_id``, ``summary``, ``history``) -> Record."""
    summary = run["summary"]
    point = point_of(summary)
    seed = point.pop("seed", summary.get("seed"))
    final = summary.get("final") or {}
    metrics = {f"final_{k}": v for k, v in final.items() if k not in NOT_METRICS}
    metrics.update({k: summary[k] for k in RUN_LEVEL if k in summary})
    diverged = bool(summary.get("diverged"))
    return Record(run["run_id"], point, seed, metrics, run.get("history") or [], diverged)


def value_at(point: dict, key: str):
    """The value of ``key`` in a swept point: a swept key, or a dotted path into a swept
    mapping (``aggregator.beta`` when ``aggregator`` was swept); ``MISSING`` if absent."""
    if key in point:
        return point[key]
    prefixes = sorted((k for k in point if key.startswith(k + ".")), key=len, reverse=True)
    for prefix in prefixes:
        value = point[prefix]
        for part in key[len(prefix) + 1 :].split("."):
            if not isinstance(value, dict) or part not in value:
                return MISSING
            value = value[part]
        return value
    return MISSING


@dataclasses.dataclass
class Axis:
    """A swept key with its distinct values in display order and their labels."""

    key: str
    values: list
    labels: list[str]

    def __post_init__(self):
        self._position = {_ident(v): i for i, v in enumerate(self.values)}

    def index(self, point: dict) -> int:
        """Position of a point's value on this axis."""
        return self._position[_ident(value_at(point, self.key))]


def axis_of(records: list[Record], key: str) -> Axis:
    """The axis of ``key`` over ``records``: distinct values, ordered, uniquely labelled
    (values whose short labels collide fall back to their full JSON)."""
    distinct = {_ident(value_at(r.point, key)): value_at(r.point, key) for r in records}
    values = sorted(distinct.values(), key=_order)
    labels = [label_of(v) for v in values]
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = _ident(values[i])
    return Axis(key, values, labels)


def swept_keys(records: list[Record]) -> list[str]:
    """Every swept key but seed, in sweep-file order (first-seen over runs)."""
    return list(dict.fromkeys(k for r in records for k in r.point))


def swept_axes(records: list[Record]) -> list[Axis]:
    """The axes the user swept that take at least two values, in sweep-file order."""
    axes = [axis_of(records, k) for k in swept_keys(records)]
    return [a for a in axes if len(a.values) > 1]


def key_choices(records: list[Record]) -> list[str]:
    """Keys ``--x``/``--y``/``--conflict`` accept: swept keys, and dotted paths into swept
    mappings."""
    keys = swept_keys(records)
    inner = [
        k
        for r in records
        for name, v in r.point.items()
        if isinstance(v, dict)
        for k in _flatten({name: v})
    ]
    return list(dict.fromkeys(keys + inner))


def check_key(records: list[Record], key: str, flag: str) -> str:
    """``key`` if ``--flag`` may name it, else a one-line ConfigError naming the choices."""
    choices = key_choices(records)
    if key not in choices:
        raise ConfigError(f"unknown {flag} {key!r}; swept keys: {', '.join(choices)}")
    return key


def _seeds(records: list[Record]) -> str:
    """``"3 seeds"``, ``"1 seed"`` or ``"2–3 seeds"`` (runs per setting)."""
    counts: dict[str, int] = {}
    for r in records:
        ident = _ident(r.point)
        counts[ident] = counts.get(ident, 0) + 1
    lo, hi = min(counts.values(), default=0), max(counts.values(), default=0)
    n = str(lo) if lo == hi else f"{lo}–{hi}"
    return f"{n} seed" + ("" if hi == 1 else "s")


# ----------------------------------------------------------------------------- metrics


def eval_metric(name: str) -> str:
    """The per-evaluation metric behind a run-level name: ``final_test_accuracy``,
    ``best_test_accuracy`` -> ``test_accuracy``."""
    return re.sub(r"^(final|best|peak)_", "", name)


def run_metric(name: str) -> str:
    """The run-level name of a metric: ``test_accuracy`` -> ``final_test_accuracy``."""
    return name if re.match(r"^(final|best|peak)_", name) else f"final_{name}"


def metric_words(name: str) -> str:
    """``final_attack_success_rate`` -> ``final attack success rate``."""
    base = eval_metric(name)
    words = METRIC_INFO.get(base, (base.replace("_", " "),))[0]
    prefix = name[: len(name) - len(base)].replace("_", " ")
    return prefix + words


def metric_unit(name: str) -> str:
    """The metric's unit in words, or ``""``."""
    return METRIC_INFO.get(eval_metric(name), ("", ""))[1]


def metric_range(name: str) -> tuple[float, float] | None:
    """Fixed colour/axis range of a metric (0–1 for rates and shares), or None."""
    info = METRIC_INFO.get(eval_metric(name))
    return info[2] if info else None


def metric_choices(records: list[Record]) -> list[str]:
    """Per-evaluation metrics in any history, then run-level ones that are not final_."""
    evals = [k for r in records for rec in r.history for k in rec if k not in NOT_METRICS]
    levels = [k for r in records for k in r.metrics if not k.startswith("final_")]
    return list(dict.fromkeys(evals)) + list(dict.fromkeys(levels))


def check_metric(records: list[Record], name: str) -> str:
    """``name`` if some run records it (as ``name`` or ``final_name``), else ConfigError."""
    choices = metric_choices(records)
    known = set(choices) | {k for r in records for k in r.metrics}
    if name not in known:
        raise ConfigError(
            f"unknown --metric {name!r}; choose one of {', '.join(choices)} (or final_<metric>)"
        )
    return name


@dataclasses.dataclass
class Stat:
    """Mean and (population) std over the runs of a cell that have a value; ``reason``
    says why there is none (``mean`` None)."""

    mean: float | None
    std: float | None
    n: int
    reason: str = ""


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def missing_reason(records: list[Record], metric: str) -> str:
    """Why ``records`` give no value of a run-level metric: ``not run`` (no runs), ``no
    target`` / ``no baseline`` / ``not recorded`` (no run records it), ``diverged``."""
    if not records:
        return "not run"
    if not any(metric in r.metrics for r in records):
        return ABSENT_REASON.get(eval_metric(metric), "not recorded")
    return "diverged" if any(r.diverged for r in records) else "no value"


def stat_of(records: list[Record], metric: str) -> Stat:
    """Mean ± std of a run-level metric over ``records`` (no numpy: no warnings)."""
    values = [float(r.metrics[metric]) for r in records if _finite(r.metrics.get(metric))]
    if not values:
        return Stat(None, None, 0, missing_reason(records, metric))
    return Stat(statistics.fmean(values), statistics.pstdev(values), len(values))


def fmt_stat(stat: Stat, digits: int = 3, with_std: bool = True) -> str:
    """``0.931 ± 0.004`` (std left out for one value), or the reason for no value."""
    if stat.mean is None:
        return stat.reason
    text = f"{stat.mean:.{digits}f}" if abs(stat.mean) < 1e4 else f"{stat.mean:.3g}"
    return text + (f" ± {stat.std:.{digits}f}" if with_std and stat.n > 1 else "")


# ------------------------------------------------------------------------------ tables


@dataclasses.dataclass
class Table:
    """A metric over ``rows`` x ``cols`` axes (None: one row / column of all runs); each
    cell pools the runs there over seeds and the ``pooled`` axes."""

    metric: str
    rows: Axis | None
    cols: Axis | None
    cells: list[list[Stat]]
    pooled: list[str]
    seeds: str

    def row_labels(self) -> list[str]:
        return self.rows.labels if self.rows else ["all runs"]

    def col_labels(self) -> list[str]:
        return self.cols.labels if self.cols else [metric_words(self.metric)]


def _members(records: list[Record], axis: Axis | None, n: int) -> list[list[Record]]:
    """``records`` split by their position on ``axis`` (all in one when axis is None)."""
    if axis is None:
        return [records]
    out: list[list[Record]] = [[] for _ in range(n)]
    for r in records:
        out[axis.index(r.point)].append(r)
    return out


def compact_table(
    records: list[Record], metric: str, rows: Axis | None, cols: Axis | None
) -> Table:
    """A run-level metric's ``mean ± std`` over ``rows`` x ``cols`` (see ``Table``)."""
    n_rows = len(rows.values) if rows else 1
    n_cols = len(cols.values) if cols else 1
    cells = [
        [stat_of(cell, metric) for cell in _members(members, cols, n_cols)]
        for members in _members(records, rows, n_rows)
    ]
    used = {a.key for a in (rows, cols) if a}
    pooled = [a.key for a in swept_axes(records) if a.key not in used]
    return Table(metric, rows, cols, cells, pooled, _seeds(records))


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
    stats = [
        [stat_of(cell, m) for m in metrics]
        for cell in _members(records, rows, len(rows.values) if rows else 1)
    ]
    labels = rows.labels if rows else ["all runs"]
    lines = [
        _md_row([rows.key if rows else "", *(metric_words(m) for m in metrics)]),
        "|" + "---|" * (1 + len(metrics)),
    ]
    lines += [
        _md_row([lab, *(fmt_stat(s) for s in row)]) for lab, row in zip(labels, stats, strict=True)
    ]
    return "\n".join(lines) + "\n"


def table_metrics(records: list[Record], metric: str | None = None) -> list[str]:
    """Metrics that matter for the tables: final test accuracy, final attack success rate
    (when some run has a target), final malicious weight (when some run gives malicious
    clients weight), then ``metric`` when named."""
    out = []
    for m in TABLE_METRICS:
        values = [r.metrics.get(m) for r in records]
        if m == "final_malicious_weight" and not any(_finite(v) and v for v in values):
            continue
        if any(_finite(v) for v in values):
            out.append(m)
    if metric is not None and run_metric(metric) not in out:
        out.append(run_metric(metric))
    return out


def default_pair(axes: list[Axis]) -> tuple[Axis | None, Axis | None]:
    """(rows, cols) for tables: the two axes with the most values (rows the longer; ties in
    sweep order); one axis -> (it, None); none -> (None, None)."""
    ranked = sorted(axes, key=lambda a: -len(a.values))[:2]
    ranked.sort(key=lambda a: (-len(a.values), axes.index(a)))
    return (ranked + [None, None])[0], (ranked + [None, None])[1]


def slices(records: list[Record], keys: list[str]) -> list[tuple[str, list[Record]]]:
    """``records`` split by every combination of the axes ``keys`` -> ``[(title, runs)]``
    (one untitled slice of all runs if there are more than ``MAX_SLICES``)."""
    axes = [axis_of(records, k) for k in keys]
    combos = math.prod(len(a.values) for a in axes)
    if not axes or combos > MAX_SLICES:
        return [("", records)]
    out = []
    for idx in itertools.product(*[range(len(a.values)) for a in axes]):
        members = [
            r for r in records if all(a.index(r.point) == i for a, i in zip(axes, idx, strict=True))
        ]
        title = ", ".join(f"{a.key} = {a.labels[i]}" for a, i in zip(axes, idx, strict=True))
        if members:
            out.append((title, members))
    return out


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
        note = f"mean ± std over {_seeds(records)} (population std)"
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
    settings = len({_ident(r.point) for r in records})
    where = ", ".join(f"`{d}`" for d in dirs)
    plural = "s" if settings != 1 else ""
    lines = [
        f"{len(records)} runs from {where}: {settings} setting{plural}, {_seeds(records)} each."
    ]
    for a in swept_axes(records):
        shown = ", ".join(a.labels[:12]) + (", …" if len(a.labels) > 12 else "")
        lines.append(f"- `{a.key}` ({len(a.values)} values): {shown}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures


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
    import matplotlib

    return matplotlib.colormaps["tab10" if i < 10 else "tab20"]((i % 20) / (9 if i < 10 else 19))


def _metric_axis_label(metric: str) -> str:
    unit = metric_unit(metric)
    return metric_words(metric) + (f" ({unit})" if unit else "")


@dataclasses.dataclass
class Series:
    """One curve: a setting's labels per key, and the mean / std over its runs per round
    (empty ``rounds``: no run records the metric, for ``reason``)."""

    parts: dict  # axis key -> value label
    rounds: list[int]
    mean: list[float]
    std: list[float]
    n: int
    reason: str = ""


def curve_series(records: list[Record], metric: str, axes: list[Axis]) -> list[Series]:
    """Mean and std over runs of a per-evaluation ``metric`` at each round, one Series per
    combination of ``axes`` present, in axis order."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault(tuple(a.index(r.point) for a in axes), []).append(r)
    out = []
    for idx in sorted(groups):
        by_round: dict[int, list[float]] = {}
        for r in groups[idx]:
            for rec in r.history:
                if _finite(rec.get(metric)) and "round" in rec:
                    by_round.setdefault(rec["round"], []).append(float(rec[metric]))
        rounds = sorted(by_round)
        parts = {a.key: a.labels[i] for a, i in zip(axes, idx, strict=True)}
        reason = "" if rounds else missing_reason(groups[idx], run_metric(metric))
        mean = [statistics.fmean(by_round[t]) for t in rounds]
        std = [statistics.pstdev(by_round[t]) for t in rounds]
        out.append(Series(parts, rounds, mean, std, len(groups[idx]), reason))
    return out


def _panel_key(series: list[Series], keys: list[str]) -> str | None:
    """The key whose values split ``series`` into the fewest panels of at most
    ``MAX_LINES`` lines (or, if none does, the key with the most values)."""
    if len(series) <= MAX_LINES or len(keys) < 2:
        return None

    def cost(key):
        counts: dict[str, int] = {}
        for s in series:
            counts[s.parts[key]] = counts.get(s.parts[key], 0) + 1
        return (
            max(counts.values()) > MAX_LINES,
            len(counts) if max(counts.values()) <= MAX_LINES else -len(counts),
        )

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
    seeds = _seeds(records)
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
    for ax in grid[-1]:
        ax.set_xlabel("round")
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
    for s in members:
        label = _line_label(s, line_keys)
        if not s.rounds:
            ax.plot([], [], ls="none", label=f"{label}: {s.reason}")
            continue
        (line,) = ax.plot(
            s.rounds, s.mean, marker="o", ms=3, lw=1.4, color=colours[label], label=label
        )
        handles.setdefault(label, line)
        if s.n > 1:
            lo = [m - d for m, d in zip(s.mean, s.std, strict=True)]
            hi = [m + d for m, d in zip(s.mean, s.std, strict=True)]
            ax.fill_between(s.rounds, lo, hi, color=colours[label], alpha=0.18, lw=0)
    if all(not s.rounds for s in members):
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


# ---------------------------------------------------------------------------- conflict


@dataclasses.dataclass
class ConflictPoint:
    """A knob value of one group: final honest weight (x) and attack success rate (y)."""

    value: Any
    label: str  # e.g. "β=0.1"
    honest_weight: Stat
    attack_success: Stat


def _without(value, path: list[str]):
    """A copy of a swept mapping without the option at ``path`` (a knob inside it)."""
    if not path or not isinstance(value, dict) or path[0] not in value:
        return value
    if len(path) == 1:
        return {k: v for k, v in value.items() if k != path[0]}
    return {**value, path[0]: _without(value[path[0]], path[1:])}


def _knob_of(record: Record, knobs: list[str]) -> tuple[str | None, Any]:
    """The first of ``knobs`` this run's point has, with its value."""
    for knob in knobs:
        value = value_at(record.point, knob)
        if value is not MISSING:
            return knob, value
    return None, MISSING


def _group_label(record: Record, axes: list[Axis], knobs: list[str]) -> str:
    """The run's values on the group axes, labelled without the knobs inside them."""
    parts = []
    for a in axes:
        value = value_at(record.point, a.key)
        for knob in knobs:
            if knob.startswith(a.key + "."):
                value = _without(value, knob[len(a.key) + 1 :].split("."))
        parts.append(label_of(value))
    return ", ".join(parts) or "all runs"


def conflict_points(
    records: list[Record], knobs: str | list[str], group_keys: list[str] | None = None
) -> dict[str, list[ConflictPoint]]:
    """Conflict-curve points: runs grouped by ``group_keys`` (default: every swept axis
    that is not a knob; a knob inside a swept mapping is left out of its label, so
    ``trimmed_mean(β=0.1)`` groups as ``trimmed_mean``), then by the value of the first of
    ``knobs`` (a key or comma-separated keys, e.g. ``aggregator.beta,aggregator.f``) they
    have. Each point pools its runs' final honest weight and final attack success rate;
    points without both are left out. Returns ``{group label: points ordered by knob}``."""
    knobs = [k.strip() for k in knobs.split(",")] if isinstance(knobs, str) else list(knobs)
    if group_keys is None:
        axes = [a for a in swept_axes(records) if a.key not in knobs]
    else:
        axes = [axis_of(records, k) for k in group_keys]
    cells: dict[str, dict[str, list]] = {}
    for r in records:
        knob, value = _knob_of(r, knobs)
        if knob is None:
            continue
        cell = cells.setdefault(_group_label(r, axes, knobs), {})
        cell.setdefault(_ident(value), [knob, value, []])[2].append(r)
    out: dict[str, list[ConflictPoint]] = {}
    for group in sorted(cells, key=_natural):
        points = []
        for knob, value, members in sorted(cells[group].values(), key=lambda c: _order(c[1])):
            hw = stat_of(members, "final_honest_weight")
            asr = stat_of(members, "final_attack_success_rate")
            if hw.mean is not None and asr.mean is not None:
                points.append(ConflictPoint(value, knob_label(knob, value), hw, asr))
        if points:
            out[group] = points
    return out


def conflict_figure(
    points: dict[str, list[ConflictPoint]], knob: str, seeds: str = "", groups: str = ""
):
    """Final attack success rate (y) against final honest weight (x), one line per group
    (legend titled ``groups``), points labelled with their knob value; error bars when
    points pool several runs."""
    fig = _figure(6.8, 4.8)
    ax = fig.subplots()
    for i, (group, pts) in enumerate(points.items()):
        xs = [p.honest_weight.mean for p in pts]
        ys = [p.attack_success.mean for p in pts]
        xerr = [p.honest_weight.std if p.honest_weight.n > 1 else 0.0 for p in pts]
        yerr = [p.attack_success.std if p.attack_success.n > 1 else 0.0 for p in pts]
        style = dict(marker="o", ms=4, capsize=2, lw=1.4, color=_colour(i), label=group)
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, **style)
        for p, x, y in zip(pts, xs, ys, strict=True):
            ax.annotate(p.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(_metric_axis_label("final_honest_weight"))
    ax.set_ylabel(_metric_axis_label("final_attack_success_rate"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title=groups or None, title_fontsize=7)
    spread = f"mean ± std over {seeds}" if seeds and not seeds.startswith("1 seed") else seeds
    knobs = ", ".join(knob.split(","))
    fig.suptitle(f"attack success vs honest weight along {knobs}\n{spread}", fontsize=10)
    return fig


# ------------------------------------------------------------------- summary.csv (as before)


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
    vals = [float(v) for v in values if _finite(v)]
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


# ------------------------------------------------------------------------------ report


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
    return runs, [record_of(r) for r in runs]


def _has_curve(records: list[Record], metric: str) -> bool:
    return any(_finite(rec.get(metric)) for r in records for rec in r.history)


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
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text)


def heatmap_plots(records, metric=None, x=None, y=None) -> list[Plot]:
    """Heatmaps of ``metric`` (default: final test accuracy, and final attack success rate
    when some run has one) over ``heatmap_pairs``, at most ``MAX_HEATMAPS``."""
    if metric:
        metrics = [run_metric(metric)]
    else:
        metrics = [m for m in TABLE_METRICS[:2] if any(_finite(r.metrics.get(m)) for r in records)]
    plots = []
    for rows, cols in heatmap_pairs(records, x, y):
        for m in metrics:
            name = f"heatmap_{m}__{_safe(rows.key)}__{_safe(cols.key)}.png"
            caption = f"{metric_words(m)} over {rows.key} (rows) × {cols.key} (columns)"
            build = lambda m=m, a=rows, b=cols: heatmap_figure(compact_table(records, m, a, b))
            plots.append(Plot(name, caption, build))
    return plots[:MAX_HEATMAPS]


def conflict_plot(records: list[Record], knob: str) -> Plot:
    """The conflict curve along ``knob``; ConfigError if no run gives it a point."""
    knobs = [check_key(records, k.strip(), "--conflict") for k in knob.split(",")]
    points = conflict_points(records, knobs)
    if not points:
        raise ConfigError(
            f"--conflict {knob}: no run with that knob has both a final attack success rate "
            "and a final honest weight (a targeted attack is needed)"
        )
    groups = ", ".join(a.key for a in swept_axes(records) if a.key not in knobs)
    caption = f"final attack success rate vs final honest weight along {knob}"
    caption += f", one line per {groups}" if groups else ""
    name = f"conflict_{_safe(knob)}.png"
    return Plot(name, caption, lambda: conflict_figure(points, knob, _seeds(records), groups))


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
    dirs, out, x=None, y=None, metric=None, conflict=None, progress: bool = False
) -> list[Path]:
    """Write the tables, figures and REPORT.md of the sweep folders ``dirs`` into ``out``
    (see the module docstring); returns the files written. ``x``/``y``: swept keys for the
    heatmap columns/rows, the table columns/rows and the curves' lines/panels; ``metric``:
    the one metric to plot; ``conflict``: knob key(s) of a conflict curve. Unknown keys or
    metrics, or no finished runs, raise a one-line ConfigError before anything is written."""
    runs, records = load_records(dirs, progress)
    if not runs:
        raise ConfigError(f"no finished runs under {', '.join(str(d) for d in dirs)}")
    x = x and check_key(records, x, "--x")
    y = y and check_key(records, y, "--y")
    metric = metric and check_metric(records, metric)
    if x and x == y:
        raise ConfigError(f"--x and --y name the same key {x!r}")
    plots = curve_plots(records, metric, x, y) + heatmap_plots(records, metric, x, y)
    plots += [conflict_plot(records, conflict)] if conflict else []
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
    summary_md, report_md = _markdown_files(
        records, dirs, table_metrics(records, metric), pair, plots
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

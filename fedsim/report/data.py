"""Run records and what the report computes from them, without plotting: swept axes,
metric names, per-cell statistics, compact tables, curve series and conflict points."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import statistics
from typing import Any

from fedsim.registry import ConfigError
from fedsim.report.labels import MISSING, ident, knob_label, label_of, natural_key, order_key
from fedsim.sweep import _flatten, point_of

TABLE_METRICS = ("final_test_accuracy", "final_attack_success_rate", "final_malicious_weight")
RUN_LEVEL = ("best_test_accuracy", "best_test_loss", "peak_attack_success_rate")
NOT_METRICS = ("round", "seconds", "finite")
MAX_SLICES = 4  # tables split by the other axes up to this many slices, else pool them
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
    "honest_accepted": ("honest clients used", "fraction of present honest clients", (0, 1)),
    "worst_test_accuracy": ("worst honest node's test accuracy", "fraction correct", (0, 1)),
    "consensus_distance": ("consensus distance", "L2", None),
    "collaboration_gain": ("collaboration gain", "accuracy minus alone", None),
    "malicious_share": ("malicious share of a round", "attackers / participants", (0, 1)),
    "mean_malicious_share": ("malicious share of a round, mean", "over rounds", (0, 1)),
    "max_malicious_share": ("malicious share of a round, max", "over rounds", (0, 1)),
    "accuracy_rest": ("accuracy outside the goal", "fraction correct", (0, 1)),
    "goal_shift": ("steering shift toward 0 on the goal", "signed error", None),
}
# why a run has no value of a metric it never records
ABSENT_REASON = {"attack_success_rate": "no target", "accuracy_drop": "no baseline"}


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
        self._position = {ident(v): i for i, v in enumerate(self.values)}

    def index(self, point: dict) -> int:
        """Position of a point's value on this axis."""
        return self._position[ident(value_at(point, self.key))]


def axis_of(records: list[Record], key: str) -> Axis:
    """The axis of ``key`` over ``records``: distinct values, ordered, uniquely labelled
    (values whose short labels collide fall back to their full JSON)."""
    distinct = {ident(value_at(r.point, key)): value_at(r.point, key) for r in records}
    values = sorted(distinct.values(), key=order_key)
    labels = [label_of(v) for v in values]
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = ident(values[i])
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


def seeds_note(records: list[Record]) -> str:
    """``"3 seeds"``, ``"1 seed"`` or ``"2–3 seeds"`` (runs per setting)."""
    counts: dict[str, int] = {}
    for r in records:
        key = ident(r.point)
        counts[key] = counts.get(key, 0) + 1
    lo, hi = min(counts.values(), default=0), max(counts.values(), default=0)
    n = str(lo) if lo == hi else f"{lo}–{hi}"
    return f"{n} seed" + ("" if hi == 1 else "s")


def eval_metric(name: str) -> str:
    """The per-evaluation metric behind a run-level name: ``final_test_accuracy``,
    ``best_test_accuracy`` -> ``test_accuracy``."""
    return re.sub(r"^(final|best|peak|mean|max)_", "", name)


def run_metric(name: str) -> str:
    """The run-level name of a metric: ``test_accuracy`` -> ``final_test_accuracy``."""
    return name if re.match(r"^(final|best|peak|mean|max)_", name) else f"final_{name}"


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


def is_number(value) -> bool:
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
    values = [float(r.metrics[metric]) for r in records if is_number(r.metrics.get(metric))]
    if not values:
        return Stat(None, None, 0, missing_reason(records, metric))
    return Stat(statistics.fmean(values), statistics.pstdev(values), len(values))


def fmt_stat(stat: Stat, digits: int = 3, with_std: bool = True) -> str:
    """``0.931 ± 0.004`` (std left out for one value), or the reason for no value."""
    if stat.mean is None:
        return stat.reason
    text = f"{stat.mean:.{digits}f}" if abs(stat.mean) < 1e4 else f"{stat.mean:.3g}"
    return text + (f" ± {stat.std:.{digits}f}" if with_std and stat.n > 1 else "")


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


def split_by(records: list[Record], axis: Axis | None) -> list[list[Record]]:
    """``records`` split by their position on ``axis`` (all in one list when it is None)."""
    if axis is None:
        return [records]
    out: list[list[Record]] = [[] for _ in axis.values]
    for r in records:
        out[axis.index(r.point)].append(r)
    return out


def compact_table(
    records: list[Record], metric: str, rows: Axis | None, cols: Axis | None
) -> Table:
    """A run-level metric's ``mean ± std`` over ``rows`` x ``cols`` (see ``Table``)."""
    cells = [
        [stat_of(cell, metric) for cell in split_by(members, cols)]
        for members in split_by(records, rows)
    ]
    used = {a.key for a in (rows, cols) if a}
    pooled = [a.key for a in swept_axes(records) if a.key not in used]
    return Table(metric, rows, cols, cells, pooled, seeds_note(records))


def table_metrics(records: list[Record], metric: str | None = None) -> list[str]:
    """Metrics that matter for the tables: final test accuracy, final attack success rate
    (when some run has a target), final malicious weight (when some run gives malicious
    clients weight), then ``metric`` when named."""
    out = []
    for m in TABLE_METRICS:
        values = [r.metrics.get(m) for r in records]
        if m == "final_malicious_weight" and not any(is_number(v) and v for v in values):
            continue
        if any(is_number(v) for v in values):
            out.append(m)
    if metric is not None and run_metric(metric) not in out:
        out.append(run_metric(metric))
    return out


def default_pair(axes: list[Axis]) -> tuple[Axis | None, Axis | None]:
    """(rows, cols) for tables: the two axes with the most values (rows the longer; ties in
    sweep order); one axis -> (it, None); none -> (None, None)."""
    ranked = sorted(axes, key=lambda a: -len(a.values))[:2]  # stable: ties keep sweep order
    rows, cols = (ranked + [None, None])[:2]
    return rows, cols


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
                if is_number(rec.get(metric)) and "round" in rec:
                    by_round.setdefault(rec["round"], []).append(float(rec[metric]))
        rounds = sorted(by_round)
        parts = {a.key: a.labels[i] for a, i in zip(axes, idx, strict=True)}
        reason = "" if rounds else missing_reason(groups[idx], run_metric(metric))
        mean = [statistics.fmean(by_round[t]) for t in rounds]
        std = [statistics.pstdev(by_round[t]) for t in rounds]
        out.append(Series(parts, rounds, mean, std, len(groups[idx]), reason))
    return out


@dataclasses.dataclass
class ConflictPoint:
    """A knob value of one group: how much of the honest clients the rule used (``x``: by
    default the final honest weight), the final attack success rate and test accuracy."""

    value: Any
    label: str  # e.g. "β=0.1"
    x: Stat
    attack_success: Stat
    accuracy: Stat


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
    records: list[Record],
    knobs: str | list[str],
    group_keys: list[str] | None = None,
    x: str = "final_honest_weight",
) -> dict[str, list[ConflictPoint]]:
    """Conflict-curve points: runs grouped by ``group_keys`` (default: every swept axis
    that is not a knob; a knob inside a swept mapping is left out of its label, so
    ``trimmed_mean(β=0.1)`` groups as ``trimmed_mean``), then by the value of the first of
    ``knobs`` (a key or comma-separated keys, e.g. ``aggregator.beta,aggregator.f``) they
    have. Each point pools its runs' ``x`` (a run-level metric: ``final_honest_weight``,
    ``final_honest_accepted``), final attack success rate and final test accuracy; points
    without ``x`` and a success rate are left out. Returns ``{group label: points ordered
    by knob}``."""
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
        cell.setdefault(ident(value), [knob, value, []])[2].append(r)
    out: dict[str, list[ConflictPoint]] = {}
    for group in sorted(cells, key=natural_key):
        points = []
        for knob, value, members in sorted(cells[group].values(), key=lambda c: order_key(c[1])):
            used = stat_of(members, x)
            asr = stat_of(members, "final_attack_success_rate")
            acc = stat_of(members, "final_test_accuracy")
            if used.mean is not None and asr.mean is not None:
                points.append(ConflictPoint(value, knob_label(knob, value), used, asr, acc))
        if points:
            out[group] = points
    return out

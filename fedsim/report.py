"""Figures and tables of finished sweeps (``fedsim report DIR [DIR ...]``).

Reads every finished run under the given sweep folders (shards written to several
folders, or into one, merge here; a run id seen twice counts once) and writes to ``out``:

- ``results.csv``: the merged per-run table (same columns as a sweep's own);
- ``summary.csv`` and ``summary.md``: one row per setting (the swept keys other than
  ``seed`` that take two or more values), with the number of seeds and the mean and
  standard deviation over seeds of the final metrics;
- ``curves_<metric>.png``: each metric over rounds, one line per setting (mean over seeds);
- ``heatmap_<metric>__<a>__<b>.png``: the final attack success rate (or test accuracy
  when no run has an attack metric) over every pair of swept axes ``a`` x ``b``, averaged
  over seeds and the other axes.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np

from fedsim.io import write_atomic
from fedsim.registry import ConfigError
from fedsim.sweep import _flatten, load_runs, point_of, row_of, to_csv, write_results

CURVE_METRICS = ("test_accuracy", "test_loss", "attack_success_rate", "malicious_weight")
SUMMARY_METRICS = (
    "final_test_accuracy",
    "best_test_accuracy",
    "final_attack_success_rate",
    "peak_attack_success_rate",
    "final_malicious_weight",
    "final_test_loss",
)
MAX_HEATMAPS = 6


def _sort_key(v):
    return (0, float(v), "") if isinstance(v, int | float) else (1, 0.0, str(v))


def axes_of(points: list[dict]) -> list[str]:
    """Swept keys (other than seed) taking at least two values, in first-seen order."""
    keys: list[str] = []
    for p in points:
        keys.extend(k for k in p if k not in keys and k != "seed")
    return [k for k in keys if len({repr(p.get(k)) for p in points}) > 1]


def _mean_std(values):
    vals = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals))


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


def to_markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no finished runs)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _label(point: dict, axes: list[str]) -> str:
    return ", ".join(f"{a}={point.get(a)}" for a in axes) or "all runs"


def plot_curves(runs: list[dict], axes: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric in CURVE_METRICS:
        if not any(metric in r for run in runs for r in run["history"]):
            continue
        groups: dict[str, list[list[dict]]] = {}
        for run in runs:
            label = _label(_flatten(point_of(run["summary"])), axes)
            groups.setdefault(label, []).append(run["history"])
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, histories in sorted(groups.items()):
            rounds = [r["round"] for r in histories[0]]
            vals = np.array(
                [
                    [np.nan if r.get(metric) is None else r[metric] for r in h]
                    for h in histories
                    if len(h) == len(rounds)
                ],
                dtype=float,
            )
            ax.plot(rounds, np.nanmean(vals, axis=0), marker="o", ms=3, label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(metric + " (mean over seeds)")
        if len(groups) <= 16:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"curves_{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_heatmaps(rows: list[dict], axes: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = (
        "final_attack_success_rate"
        if any(r.get("final_attack_success_rate") is not None for r in rows)
        else "final_test_accuracy"
    )
    written = []
    for a, b in list(itertools.combinations(axes, 2))[:MAX_HEATMAPS]:
        va = sorted({r.get(a) for r in rows}, key=_sort_key)
        vb = sorted({r.get(b) for r in rows}, key=_sort_key)
        grid = np.full((len(va), len(vb)), np.nan)
        for i, x in enumerate(va):
            for j, y in enumerate(vb):
                mean, _ = _mean_std(
                    [r.get(metric) for r in rows if r.get(a) == x and r.get(b) == y]
                )
                grid[i, j] = np.nan if mean is None else mean
        fig, ax = plt.subplots(figsize=(1.2 * len(vb) + 3, 0.6 * len(va) + 2.5))
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(vb)), [str(v) for v in vb], rotation=30, ha="right")
        ax.set_yticks(range(len(va)), [str(v) for v in va])
        ax.set_xlabel(b)
        ax.set_ylabel(a)
        for i, j in itertools.product(range(len(va)), range(len(vb))):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax, label=metric + " (mean)")
        fig.tight_layout()
        safe = lambda s: "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in s)
        path = out / f"heatmap_{metric}__{safe(a)}__{safe(b)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def make_report(dirs, out) -> list[Path]:
    """Write the merged table, the summary and the figures; returns the files written."""
    runs = load_runs(dirs)
    if not runs:
        raise ConfigError(f"no finished runs under {', '.join(str(d) for d in dirs)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row_of(r) for r in runs]
    axes = axes_of([_flatten(point_of(r["summary"])) for r in runs])
    written = write_results(out, rows)
    summary = summary_rows(rows, axes)
    write_atomic(out / "summary.csv", to_csv(summary))
    write_atomic(out / "summary.md", to_markdown(summary))
    written += [out / "summary.csv", out / "summary.md"]
    written += plot_curves(runs, axes, out)
    written += plot_heatmaps(rows, axes, out)
    return written

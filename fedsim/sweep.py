"""Sweeps: a grid of configs run as vmapped programs, resumably (DESIGN.md, "sweep.py").

A sweep file is a mapping::

    base: configs/digits.yaml      # a config file (relative to the CWD, else to this file)
                                   # or an inline mapping of config keys
    grid:                          # cartesian product over dotted config keys
      client.lr: [0.05, 0.1]
      attack: [{name: none}, {name: alie, fraction: 0.2}]
    zip:                           # lists advanced together (one mapping, or a list of
      attack.z: [0.5, 1.0]         # mappings each advanced on its own); every list of a
      server.lr: [1.0, 0.5]        # mapping has the same length
    seeds: 3                       # an int n (seeds 0..n-1) or a list of seeds
    quick:                         # optional: the reduced form (``--quick``), see ``quick_doc``
      set: {rounds: 10}            # dotted config keys set on the base
      grid: {client.lr: [0.1]}     # grid lists replaced (or added), key by key
      seeds: 1                     # zip and seeds replaced when given

Every point of ``grid x zip blocks x seeds`` is one run. Its ``run_id`` is a stable hash
of its resolved config (so a point means the same run in every sweep that contains it).
Runs are grouped by what fixes the compiled program (the ``Spec`` and the structure of
``HParams``); each group is prepared once and run as one program ``vmap``-ed over its runs'
seeds and HParams, in batches that the memory planner (``fedsim.memory``) sizes to fit.

Output folder ``DIR``: ``DIR/sweep.yaml`` (the sweep as resolved), ``DIR/runs/<run_id>/``
with ``config.yaml``, ``metrics.jsonl`` and, written last, ``summary.json`` (its presence
marks the run as done), all written atomically; ``DIR/results.csv`` (and
``results.parquet`` when pyarrow is importable): one row per finished run. Rerunning skips
finished runs; ``--shard i/k`` keeps the runs whose ``run_id`` falls in part ``i`` of ``k``.
"""

from __future__ import annotations

import copy
import csv
import io as _io
import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedsim.checkpoint import Checkpoints, batch_identity, config_identity, read_meta, remove
from fedsim.config import (
    DEFAULTS,
    _merge,
    dump,
    read_config_file,
    read_yaml_file,
    set_path,
    to_spec,
    validate,
)
from fedsim.io import check_out_dir, write_atomic, write_json
from fedsim.registry import ConfigError
from fedsim.runner import balanced, run_batches, summarize

SWEEP_KEYS = ("base", "grid", "zip", "seeds", "quick")
QUICK_KEYS = ("set", "grid", "zip", "seeds")
CPU_MAX_BATCH = 1  # default cap on runs per program on CPU (see run_sweep)


@dataclass
class RunPoint:
    """One run of a sweep: its id, resolved config and the swept values that made it."""

    run_id: str
    cfg: dict
    point: dict  # dotted key -> value, for every swept key, plus "seed"


@dataclass
class Sweep:
    runs: list[RunPoint]
    keys: list[str]  # swept keys in file order, then "seed"
    resolved: dict = field(default_factory=dict)  # the sweep with its base inlined


def run_id(cfg: dict) -> str:
    """A stable 16-hex-digit hash of a resolved config (key order does not matter), without
    the keys that do not change results (``checkpoint_every``)."""
    return config_identity(cfg)


def _base_config(base: Any, sweep_path: Path | None) -> dict:
    if base is None:
        raise ConfigError(
            "the sweep has no 'base'; add base: <config file or mapping> "
            "(e.g. base: configs/digits.yaml)"
        )
    if isinstance(base, dict):
        return base
    if isinstance(base, str):
        candidates = [Path(base)]
        if sweep_path is not None and not Path(base).is_absolute():
            candidates.append(sweep_path.parent / base)
        for cand in candidates:
            if cand.exists():
                return read_config_file(cand, "base config")
        raise ConfigError(f"base config {base!r} does not exist")
    raise ConfigError(f"sweep 'base' must be a config path or a mapping, got {type(base).__name__}")


def _axes(doc: dict) -> list[tuple[tuple[str, ...], list[tuple]]]:
    """The sweep's independent axes: each is (keys, list of value tuples)."""
    axes = []
    grid = doc.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError("sweep 'grid' must be a mapping of dotted key -> list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid.{key} must be a non-empty list of values, got {values!r}")
        axes.append(((str(key),), [(v,) for v in values]))
    blocks = doc.get("zip") or []
    blocks = [blocks] if isinstance(blocks, dict) else blocks
    if not isinstance(blocks, list):
        raise ConfigError("sweep 'zip' must be a mapping (or a list of mappings) of key -> list")
    for block in blocks:
        if not isinstance(block, dict) or not block:
            raise ConfigError("each zip block must be a non-empty mapping of key -> list")
        lengths = set()
        for key, values in block.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"zip.{key} must be a non-empty list of values, got {values!r}")
            lengths.add(len(values))
        if len(lengths) != 1:
            sizes = ", ".join(f"{k}: {len(v)}" for k, v in block.items())
            raise ConfigError(f"zip lists must have equal lengths, got {sizes}")
        keys = tuple(str(k) for k in block)
        axes.append((keys, list(zip(*block.values(), strict=True))))
    seen: set[str] = set()
    for keys, _ in axes:
        for key in keys:
            if key in seen or key == "seed":
                raise ConfigError(f"sweep key {key!r} is set twice (use 'seeds' for seeds)")
            seen.add(key)
    return axes


def _seeds(doc: dict, base_seed: int) -> list[int]:
    seeds = doc.get("seeds", [base_seed])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ConfigError(f"sweep 'seeds' must be >= 1 or a list of seeds, got {seeds}")
        return list(range(seeds))
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise ConfigError(f"sweep 'seeds' must be an int or a list of seeds >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"sweep 'seeds' lists a seed twice: {seeds}")
    return seeds


def quick_doc(doc: dict, base: dict) -> tuple[dict, dict]:
    """``(doc, base)`` with the sweep's ``quick`` block applied: ``set`` (dotted config key
    -> value) on the base config, each ``grid`` list replacing (or adding) that key's list,
    ``zip`` and ``seeds`` replacing the sweep's. ConfigError if there is no such block."""
    quick = doc.get("quick")
    if not isinstance(quick, dict) or not quick:
        raise ConfigError(
            "--quick: the sweep has no 'quick' block (a mapping of set, grid, zip, seeds)"
        )
    unknown = sorted(set(quick) - set(QUICK_KEYS))
    if unknown:
        raise ConfigError(f"unknown quick key {unknown[0]!r}; valid keys: {', '.join(QUICK_KEYS)}")
    for key, part in (("set", quick.get("set")), ("grid", quick.get("grid"))):
        if part is not None and not isinstance(part, dict):
            raise ConfigError(f"quick.{key} must be a mapping of dotted key -> value")
    for key, value in (quick.get("set") or {}).items():
        try:
            base = set_path(base, str(key), copy.deepcopy(value))
        except ConfigError as err:
            raise ConfigError(f"quick.set key {key!r}: {err}") from None
    out = {**doc, "grid": {**(doc.get("grid") or {}), **(quick.get("grid") or {})}}
    out.update({k: quick[k] for k in ("zip", "seeds") if k in quick})
    return out, base


def expand(doc: Any, sweep_path: Path | None = None, quick: bool = False) -> Sweep:
    """Expand a sweep document into validated runs (see the module docstring); ``quick``:
    its reduced form (``quick_doc``)."""
    if not isinstance(doc, dict):
        raise ConfigError("a sweep file must hold a mapping with base, grid, zip and seeds")
    unknown = sorted(set(doc) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"unknown sweep key {unknown[0]!r}; valid keys: {', '.join(SWEEP_KEYS)}")
    base = _merge(copy.deepcopy(DEFAULTS), _base_config(doc.get("base"), sweep_path))
    if quick:
        doc, base = quick_doc(doc, base)
    axes = _axes(doc)
    seeds = _seeds(doc, base["seed"])
    keys = [k for ks, _ in axes for k in ks] + ["seed"]
    runs, ids = [], set()
    for combo in itertools.product(*[values for _, values in axes]):
        point = {}
        for (ks, _), values in zip(axes, combo, strict=True):
            point.update(zip(ks, values, strict=True))
        cfg = base
        for key, value in point.items():
            try:
                cfg = set_path(cfg, key, copy.deepcopy(value))
            except ConfigError as err:
                raise ConfigError(f"sweep key {key!r}: {err}") from None
        for seed in seeds:
            run_cfg = copy.deepcopy(cfg)
            run_cfg["seed"] = seed
            try:
                validate(run_cfg)
            except ConfigError as err:
                where = ", ".join(f"{k}={v}" for k, v in point.items()) or "base"
                raise ConfigError(f"sweep point {where}: {err}") from None
            rid = run_id(run_cfg)
            if rid in ids:  # e.g. a grid over a key whose values resolve to the same config
                continue
            ids.add(rid)
            runs.append(RunPoint(rid, run_cfg, {**point, "seed": seed}))
    resolved = {k: v for k, v in doc.items() if k not in ("base", "quick")}
    resolved = {"base": base, **resolved}
    return Sweep(runs, keys, resolved)


def load_sweep(path: str | Path, quick: bool = False) -> Sweep:
    """Read and expand a sweep file (``quick``: its reduced form, see ``quick_doc``)."""
    path = Path(path)
    doc = read_yaml_file(path, "sweep file")
    if doc is None:
        raise ConfigError(
            f"sweep file {str(path)!r} is empty; write base, grid, zip and seeds into it "
            "(e.g. start from a copy of configs/sweeps/digits.yaml)"
        )
    return expand(doc, path, quick)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/k"`` (0 <= i < k) -> ``(i, k)``."""
    if text is None:
        return None
    try:
        i, k = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard expects I/K with 0 <= I < K (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < k:
        raise ConfigError(f"--shard expects I/K with 0 <= I < K (e.g. 0/4), got {text!r}")
    return i, k


def in_shard(rid: str, shard: tuple[int, int] | None) -> bool:
    """Deterministic split by run_id: run ``rid`` belongs to part ``int(rid) mod k``."""
    return shard is None or int(rid, 16) % shard[1] == shard[0]


def is_done(run_dir: Path) -> bool:
    """A run is done when its summary.json (written last, atomically) parses."""
    try:
        json.loads((run_dir / "summary.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def write_run(
    run_dir: Path, run: RunPoint, history: list[dict], extra: dict, main_metric="test_accuracy"
) -> None:
    """Record one finished run; summary.json goes last so it marks completion."""
    write_atomic(run_dir / "config.yaml", dump(run.cfg))
    write_atomic(
        run_dir / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in history)
    )
    summary = {
        "run_id": run.run_id,
        "point": run.point,
        "swept": list(run.point),
        "seed": run.cfg["seed"],
        "rounds": run.cfg["rounds"],
        **summarize(history, main_metric),
        **extra,
    }
    write_json(run_dir / "summary.json", summary)


def run_group(setup, hparams_list, seeds, batch, on_chunk=None, on_batch=None, checkpoints=None):
    """Run every (hparams, seed) of one group through the runner's one host loop;
    ``on_chunk(1, n_rounds)`` reports progress per run and chunk, ``on_batch(first,
    histories, seconds)`` each finished batch; ``checkpoints`` as in ``run_batches``."""
    rounds = {}

    def on_eval(i, record):
        if on_chunk is not None:
            on_chunk(1, record["round"] - rounds.get(i, 0))
        rounds[i] = record["round"]

    return run_batches(
        setup, hparams_list, seeds, batch, on_eval, on_batch, checkpoints=checkpoints
    )


def batch_folder(out: Path, runs: list[RunPoint], idx: list[int]) -> tuple[Path, str]:
    """``(folder, identity)`` of the checkpoints of the batch of ``runs[i] for i in idx``
    (as ``run_batches`` pads it): ``out/checkpoints/<hash of the run ids>``. A batch formed
    otherwise on a rerun (other runs, or another size) has another folder and starts over."""
    identity = batch_identity([runs[i].run_id for i in idx])
    return out / "checkpoints" / identity, identity


def group_checkpoints(out: Path, runs: list[RunPoint], stop) -> Checkpoints:
    """The checkpoints of one group's batches, saved at the smallest ``checkpoint_every``
    of its runs (0 if any has 0: on SIGTERM only); ``stop`` is set by SIGTERM."""
    every = min(r.cfg["checkpoint_every"] for r in runs)
    locate = lambda idx: batch_folder(out, runs, idx)
    return Checkpoints(locate, every, runs[0].cfg["rounds"], stop)


def check_checkpoints(out: Path) -> None:
    """Refuse (``ConfigError``) a checkpoint under ``out/checkpoints`` of another fedsim
    version (or not matching its batch), before the sweep writes anything."""
    root = Path(out) / "checkpoints"
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        read_meta(folder, folder.name)


def group_runs(runs: list[RunPoint]) -> list[tuple[Any, list[RunPoint], list]]:
    """Group runs by compiled program: (Spec, HParams structure). Returns
    ``[(spec, runs, hparams)]`` in first-seen order."""
    import jax

    groups: dict[Any, tuple[Any, list, list]] = {}
    for run in runs:
        spec, hp = to_spec(run.cfg)
        key = (spec, jax.tree.structure(hp))
        groups.setdefault(key, (spec, [], []))
        groups[key][1].append(run)
        groups[key][2].append(hp)
    return list(groups.values())


def check_layout(setup, n_runs: int, budget: int, devices: int | None, max_batch: int | None):
    """Refuse (``ConfigError``) what ``memory.lay_out`` would refuse, without laying the
    data out over the devices: too few devices, or a run that does not fit the budget."""
    from fedsim import memory
    from fedsim.layout import client_mesh

    mesh = None if devices == 1 else client_mesh(devices, setup.spec.participants)
    n_dev = 1 if mesh is None else mesh.devices.size
    return memory.plan(setup, n_runs, budget, n_devices=n_dev, max_batch=max_batch)


def run_sweep(
    sweep: Sweep,
    out: str | Path,
    shard: tuple[int, int] | None = None,
    memory_gb: float | None = None,
    mesh_devices: int | None = None,
    quiet: bool = False,
    max_batch: int | None = None,
    stop=None,
) -> dict:
    """Run every unfinished run of ``sweep`` (in ``shard``) into ``out``; write results.
    The batch in flight resumes from its latest checkpoint (``out/checkpoints/``);
    ``stop`` (a ``threading.Event``, set by SIGTERM) checkpoints it and stops. Returns
    counts ``{"total", "skipped", "ran", "groups"}``."""
    import threading

    import jax
    from tqdm import tqdm

    from fedsim import memory
    from fedsim.layout import client_mesh
    from fedsim.setup import prepare

    out = Path(out)
    check_out_dir(out, "sweep folder")
    mine = [r for r in sweep.runs if in_shard(r.run_id, shard)]
    todo = [r for r in mine if not is_done(out / "runs" / r.run_id)]
    leader = jax.process_index() == 0
    groups = group_runs(todo)
    budget = memory.budget_bytes(memory_gb)
    if max_batch is None and jax.devices()[0].platform == "cpu":
        # On CPU vmapping runs shares no compute and each [runs, m, d] pass leaves the
        # caches: on MNIST, 100 clients, FedAvg + ALIE, a run-round cost more the more runs
        # a program held (measured at 1, 2, 4 and 8; no file in bench/results records it,
        # bench/results/sweep*.json time sweeps at one run per program). One compiled
        # program then runs the group's runs one after another (`--max-batch` overrides).
        max_batch = CPU_MAX_BATCH
    if mesh_devices not in (None, 1):
        client_mesh(mesh_devices)  # refuses more devices than exist
    for spec, runs, _ in groups:  # every group's data, devices and memory, before any write
        try:
            check_layout(prepare(spec), len(runs), budget, mesh_devices, max_batch)
        except ConfigError as err:
            point = ", ".join(f"{k}={v}" for k, v in runs[0].point.items() if k != "seed")
            raise ConfigError(f"sweep point {point or 'base'}: {err}") from None
    check_checkpoints(out)
    stop = threading.Event() if stop is None else stop
    if leader:
        write_atomic(out / "sweep.yaml", yaml.safe_dump(sweep.resolved, sort_keys=False))
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        unit="run",
        disable=quiet,
        file=sys.stderr,
        smoothing=0.05,
        bar_format="{l_bar}{bar}| {n:.1f}/{total} runs [{elapsed}<{remaining}]{postfix}",
    )
    for g, (spec, runs, hps) in enumerate(groups):
        setup, plan = memory.lay_out(
            prepare(spec), len(runs), budget, mesh_devices, max_batch=max_batch
        )
        n_dev = 1 if setup.mesh is None else setup.mesh.devices.size
        bar.set_postfix_str(f"group {g + 1}/{len(groups)}, {plan.batch} runs/batch")
        per_run_rounds = spec.rounds
        on_chunk = lambda real, n, r=per_run_rounds: bar.update(real * n / r)
        extra = {
            "n_params": setup.n_params,
            "batch": balanced(len(runs), plan.batch),
            "client_chunk": plan.client_chunk,
            "devices": n_dev,
            "group_runs": len(runs),
            "device": str(jax.devices()[0]),
        }

        def record(first, histories, seconds, runs=runs, extra=extra, main=setup.task.main_metric):
            if not leader:
                return
            for run, history in zip(runs[first : first + len(histories)], histories, strict=True):
                row = {**extra, "batch_seconds": seconds}
                write_run(out / "runs" / run.run_id, run, history, row, main)
            idx = [min(first + j, len(runs) - 1) for j in range(extra["batch"])]
            remove(batch_folder(out, runs, idx)[0])

        seeds = [r.cfg["seed"] for r in runs]
        saved = group_checkpoints(out, runs, stop)
        run_group(setup, hps, seeds, plan.batch, on_chunk, on_batch=record, checkpoints=saved)
    bar.close()
    if leader:
        ids = {r.run_id for r in sweep.runs}
        write_results(out, [row for row in collect_rows([out]) if row["run_id"] in ids])
    return {
        "total": len(mine),
        "skipped": len(mine) - len(todo),
        "ran": len(todo),
        "groups": len(groups),
    }


# ---------------------------------------------------------------------------- results


def _flatten(point: dict) -> dict:
    """Swept values as table cells: mappings flatten to dotted keys, lists become JSON."""
    out = {}
    for key, value in point.items():
        if isinstance(value, dict):
            out.update(_flatten({f"{key}.{k}": v for k, v in value.items()}))
        elif isinstance(value, list | tuple):
            out[key] = json.dumps(value)
        else:
            out[key] = value
    return out


def load_runs(dirs, on_run=None) -> list[dict]:
    """Every finished run under the sweep folders ``dirs`` (several folders, or shards
    written into one, merge here; a run found twice is kept once), as dicts with
    ``run_id``, ``summary`` and ``history``. ``on_run()``, if given, is called once per
    run folder looked at (for a progress bar)."""
    found: dict[str, dict] = {}
    for d in dirs:
        root = Path(d) / "runs"
        if not Path(d).is_dir():
            raise ConfigError(f"sweep folder {str(d)!r} does not exist")
        for run_dir in sorted(root.glob("*")) if root.is_dir() else []:
            if on_run is not None:
                on_run()
            if run_dir.name in found or not is_done(run_dir):
                continue
            from fedsim.io import read_jsonl

            summary = json.loads((run_dir / "summary.json").read_text())
            history = read_jsonl(run_dir / "metrics.jsonl")
            found[run_dir.name] = {"run_id": run_dir.name, "summary": summary, "history": history}
    return [found[k] for k in sorted(found)]


def point_of(summary: dict) -> dict:
    """A run's swept values in sweep-file order (summary.json stores keys sorted)."""
    point = summary.get("point", {"seed": summary.get("seed")})
    order = summary.get("swept", list(point))
    return {k: point[k] for k in order if k in point}


def row_of(run: dict) -> dict:
    """One results-table row: run_id, swept keys, final_<metric>, best metrics."""
    s = run["summary"]
    row = {"run_id": run["run_id"], **_flatten(point_of(s))}
    for k, v in s["final"].items():
        if k not in ("seconds",):
            row[f"final_{k}"] = v
    for k in ("best_test_accuracy", "best_test_loss", "peak_attack_success_rate"):
        if k in s:
            row[k] = s[k]
    row["diverged"] = s.get("diverged")
    return row


def collect_rows(dirs) -> list[dict]:
    return [row_of(r) for r in load_runs(dirs)]


def columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    return cols


def to_csv(rows: list[dict]) -> str:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns(rows), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def write_results(out: Path, rows: list[dict]) -> list[Path]:
    """``out/results.csv`` (and ``results.parquet`` if pyarrow imports), atomically."""
    written = [Path(out) / "results.csv"]
    write_atomic(written[0], to_csv(rows))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return written
    cols = columns(rows)
    table = {}
    for c in cols:
        vals = [r.get(c) for r in rows]
        kinds = {type(v) for v in vals if v is not None}
        if len(kinds) > 1 and not kinds <= {int, float}:
            vals = [None if v is None else str(v) for v in vals]
        elif kinds == {int, float}:
            vals = [None if v is None else float(v) for v in vals]
        table[c] = vals
    path = Path(out) / "results.parquet"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(pa.table(table), tmp)
    os.replace(tmp, path)
    written.append(path)
    return written

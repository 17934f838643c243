"""Command line: ``fedsim run | sweep | report | list`` (``fedsim --help``).

Mistakes in the input are one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

from fedsim.registry import ConfigError

RUN_FILES = ("summary.json", "metrics.jsonl", "config.yaml")  # summary.json: written last
PREVIOUS = ".previous"  # where `run --overwrite` keeps the old run until the new one ends


class UsageError(Exception):
    """A command-line mistake found by argparse (printed as one line, exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse without the usage block: one line naming the problem and where help is."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"expects a finite number of GiB > 0 (e.g. 8), got {text!r}"
        )
    return value


def _at_least_1(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects an integer >= 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedsim", description="Vectorized simulator of collaborative learning under attack"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices
    run = sub.add_parser("run", help="run one simulation from a YAML config")
    run.add_argument("config", help="YAML config file (see configs/default.yaml)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set client.lr=0.05 (repeatable)",
    )
    run.add_argument("--seed", type=int, default=None, help="run seed (overrides the config)")
    run.add_argument(
        "--out", default=None, help="output folder (default runs/<config name>-<timestamp>)"
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="allow writing into a folder that already holds a run",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    _layout_args(run)
    sweep = sub.add_parser("sweep", help="run a sweep file as vmapped programs (resumable)")
    sweep.add_argument("sweep", help="sweep YAML (see configs/sweeps/)")
    sweep.add_argument(
        "--out", default=None, help="sweep folder (default runs/sweep-<file name>); rerun to resume"
    )
    sweep.add_argument(
        "--shard",
        default=None,
        metavar="I/K",
        help="run only part I of K (0 <= I < K), split by run id",
    )
    sweep.add_argument(
        "--max-batch",
        type=_at_least_1,
        default=None,
        help="at most this many runs per vmapped program (default: as many as fit; 1 on CPU)",
    )
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    _layout_args(sweep)
    report = sub.add_parser("report", help="plots and a summary table of sweep folders")
    report.add_argument("dirs", nargs="+", help="sweep folders (several shards merge)")
    report.add_argument("--out", default=None, help="report folder (default DIR/report)")
    report.add_argument(
        "--x", default=None, metavar="KEY", help="swept key for heatmap/table columns, curve lines"
    )
    report.add_argument(
        "--y", default=None, metavar="KEY", help="swept key for heatmap/table rows, curve panels"
    )
    report.add_argument(
        "--metric", default=None, metavar="NAME", help="plot only this metric (e.g. test_loss)"
    )
    report.add_argument(
        "--conflict",
        default=None,
        metavar="KNOB",
        help="conflict curve along KNOB (e.g. aggregator.beta,aggregator.f)",
    )
    report.add_argument("--quiet", action="store_true", help="no progress line")
    sub.add_parser("list", help="list every registered component")
    topo = sub.add_parser("topology", help="draw the peer-to-peer topologies (a PNG gallery)")
    topo.add_argument("--nodes", type=int, default=16, help="nodes per graph (default 16)")
    topo.add_argument("--out", default="topologies.png", help="PNG file (default topologies.png)")
    return parser


def _layout_args(p) -> None:
    p.add_argument(
        "--memory-gb",
        type=_gib,
        default=None,
        help="device memory budget in GiB (default 80%% of the device's, on CPU "
        "of physical memory)",
    )
    p.add_argument(
        "--devices",
        type=_at_least_1,
        default=None,
        help="shard each run's clients over this many devices (default: all)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-host run via jax.distributed.initialize (see README)",
    )


def _start_distributed(args) -> None:
    """Several hosts: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES
    and JAX_PROCESS_ID, or a cluster JAX detects by itself (SLURM, ...)."""
    if not args.distributed:
        return
    import os

    import jax

    env = lambda k: int(os.environ[k]) if os.environ.get(k) else None
    jax.distributed.initialize(
        coordinator_address=os.environ.get("JAX_COORDINATOR_ADDRESS"),
        num_processes=env("JAX_NUM_PROCESSES"),
        process_id=env("JAX_PROCESS_ID"),
    )


def _layout(setup, args, n_runs: int = 1):
    """Apply the memory plan and the device mesh from the command line to a Setup."""
    from fedsim import memory

    budget = memory.budget_bytes(args.memory_gb)
    return memory.lay_out(setup, n_runs, budget, args.devices)[0]


def cmd_list() -> int:
    from fedsim import aggregators, attacks, models
    from fedsim.data import PARTITIONS, REGISTRY
    from fedsim.data.group_partition import GROUP_PARTITIONS

    for title, reg in [
        ("datasets", REGISTRY),
        ("partitions", PARTITIONS),
        ("partitions by the data's own groups", GROUP_PARTITIONS),
        ("models", models.REGISTRY),
        ("aggregators", aggregators.REGISTRY),
        ("attacks", attacks.REGISTRY),
    ]:
        print(f"{title}: {', '.join(reg.names())}")
    print("datasets also: tfds:<name> for any prepared tensorflow-datasets image set")
    for name in REGISTRY.names():
        meta = REGISTRY.meta(name)
        if "source" in meta:
            print(f"  {name}: {meta['source']}, {meta.get('task', 'classification')}")
    return 0


def _out_dir(args) -> Path:
    """The run folder ``--out`` names (default ``runs/<config name>-<timestamp>``), checked:
    refused when it cannot be a folder, or already holds something and no ``--overwrite``.
    Writes nothing."""
    from fedsim.io import check_out_dir

    if args.out is not None:
        out = Path(args.out)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{Path(args.config).stem}-{stamp}"
    check_out_dir(out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(
            f"output folder {out} is not empty; choose another --out or add --overwrite"
        )
    return out


def _set_aside(out: Path) -> list[str]:
    """``--overwrite``: take the old run's files out of ``out`` before the new run writes,
    summary.json first (one rename each), so ``out`` never holds the new config next to
    the old summary. A finished run goes to ``out/.previous/`` (removed when the new run
    ends; kept if it is interrupted); what an unfinished run left is deleted, unless a
    move into ``.previous`` was itself interrupted, whose remaining files it completes.
    Returns the names moved."""
    prev = out / PREVIOUS
    finished = (out / "summary.json").is_file()
    if finished and prev.exists():
        shutil.rmtree(prev) if prev.is_dir() else prev.unlink()
    moved = []
    for name in RUN_FILES:
        path = out / name
        if not path.exists():
            continue
        if finished or (prev.is_dir() and not (prev / name).exists()):
            prev.mkdir(exist_ok=True)
            os.replace(path, prev / name)
            moved.append(name)
        else:
            path.unlink()
    return moved


def _put_back(out: Path, moved: list[str]) -> None:
    """Undo ``_set_aside`` after the new run was refused before it started."""
    for name in reversed(moved):  # summary.json last: the run is whole again only then
        os.replace(out / PREVIOUS / name, out / name)
    if moved and not any((out / PREVIOUS).iterdir()):
        (out / PREVIOUS).rmdir()


def _baseline_records(cfg: dict) -> tuple[dict, bool]:
    """``({round: record}, alone)`` of the config's baseline run (empty without one);
    ``alone``: the baseline trained every client alone (``topology: isolated``), so the
    difference is the collaboration gain."""
    if cfg.get("baseline") is None:
        return {}, False
    import yaml

    from fedsim.io import read_jsonl

    folder = Path(cfg["baseline"])
    records = read_jsonl(folder / "metrics.jsonl")
    config = folder / "config.yaml"
    alone = (
        config.is_file()
        and (yaml.safe_load(config.read_text()) or {}).get("topology", {}).get("name") == "isolated"
    )
    return {r["round"]: r for r in records}, alone


def compare_with_baseline(record: dict, base: dict, alone: bool) -> dict:
    """The metrics a baseline evaluation of the same round adds: ``accuracy_drop`` (the
    baseline's accuracy minus this run's); against a local-only baseline also
    ``collaboration_gain`` (this run's minus the clients' alone) and, per group (each
    hospital), ``group<g>_collaboration_gain``: the group's own test accuracy with the
    federation minus its honest clients' alone."""
    out = {}
    acc, base_acc = record.get("test_accuracy"), base.get("test_accuracy")
    if acc is None or base_acc is None:
        return out
    out["accuracy_drop"] = base_acc - acc
    if alone:
        out["collaboration_gain"] = acc - base_acc
        for key, value in record.items():
            if key.startswith("group") and key.endswith("_test_accuracy") and key in base:
                group = key.removesuffix("_test_accuracy")
                out[f"{group}_collaboration_gain"] = value - base[key]
    return out


def cmd_run(args) -> int:
    import jax

    from fedsim.config import dump, load_config, to_spec
    from fedsim.io import write_atomic, write_json
    from fedsim.setup import components, prepare

    cfg = load_config(args.config, args.set, args.seed)
    spec, hparams = to_spec(cfg)
    out = _out_dir(args)
    _start_distributed(args)
    setup = _layout(prepare(spec), args)  # may refuse (memory) before writing
    components(setup)  # checks that need the data (a subgroup's feature), before writing
    created = [p for p in (out, *out.parents) if not p.exists()]
    moved = _set_aside(out) if out.exists() else []
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    try:
        write_atomic(out / "config.yaml", dump(cfg))
        summary, history = _simulate(setup, hparams, cfg, metrics_path, args)
    except ConfigError:
        # a check only the first trace of the round makes: leave the folder as it was
        for name in ("config.yaml", "metrics.jsonl"):
            (out / name).unlink(missing_ok=True)
        _put_back(out, moved)
        for p in created:  # innermost first; only the folders this run made, if empty
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise
    except KeyboardInterrupt:
        if moved:
            args.interrupted_note = (
                f"evaluations so far are in {metrics_path}; the run it overwrote is in "
                f"{out / PREVIOUS}"
            )
        raise
    summary["device"] = str(jax.devices()[0])
    write_json(out / "summary.json", summary)
    shutil.rmtree(out / PREVIOUS, ignore_errors=True)
    final = history[-1]
    main = setup.task.main_metric
    value = final.get(main)
    note = " (diverged: the model became non-finite)" if summary["diverged"] else ""
    print(
        f"round {final['round']}: {main.removeprefix('test_').replace('_', ' ')} "
        f"{value if value is None else round(value, 4)}, {final['seconds']:.1f} s{note} -> {out}"
    )
    return 0


def _simulate(setup, hparams, cfg, metrics_path, args):
    """Run the simulation, appending each evaluation to ``metrics_path``; returns the
    summary (without the device) and the history."""
    from tqdm import tqdm

    from fedsim.io import append_jsonl
    from fedsim.runner import run, summarize

    spec = setup.spec
    bar = tqdm(total=spec.rounds, unit="round", disable=args.quiet, file=sys.stderr)
    last = {"round": 0, "seconds": 0.0}

    baseline, alone = _baseline_records(cfg)

    main = setup.task.main_metric  # test_accuracy, or test_r2 for regression
    short = main.removeprefix("test_")

    def on_eval(record):
        if record["round"] in baseline:
            record.update(compare_with_baseline(record, baseline[record["round"]], alone))
        append_jsonl(metrics_path, record)
        rate = (record["round"] - last["round"]) / max(record["seconds"] - last["seconds"], 1e-9)
        bar.update(record["round"] - last["round"])
        value = record.get(main)
        bar.set_postfix(
            {short: "nan" if value is None else f"{value:.4f}", "rounds_s": f"{rate:.1f}"}
        )
        last.update(record)

    history = run(setup, hparams, cfg["seed"], on_eval=on_eval)
    bar.close()
    summary = {
        "rounds": spec.rounds,
        **summarize(history, main),
        "n_params": setup.n_params,
        "seed": cfg["seed"],
    }
    return summary, history


def cmd_sweep(args) -> int:
    from fedsim.sweep import load_sweep, parse_shard, run_sweep

    sweep = load_sweep(args.sweep)
    shard = parse_shard(args.shard)
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{Path(args.sweep).stem}"
    _start_distributed(args)
    t0 = time.perf_counter()
    stats = run_sweep(
        sweep,
        out,
        shard=shard,
        memory_gb=args.memory_gb,
        mesh_devices=args.devices,
        quiet=args.quiet,
        max_batch=args.max_batch,
    )
    part = f" (shard {args.shard})" if shard else ""
    print(
        f"sweep{part}: {stats['ran']} runs in {stats['groups']} compiled groups, "
        f"{stats['skipped']} already done, {time.perf_counter() - t0:.1f} s -> "
        f"{out / 'results.csv'}"
    )
    return 0


def cmd_report(args) -> int:
    from fedsim.report import make_report

    out = Path(args.out) if args.out else Path(args.dirs[0]) / "report"
    options = {k: getattr(args, k) for k in ("x", "y", "metric", "conflict")}
    written = make_report(args.dirs, out, progress=not args.quiet, **options)
    print(f"report: {len(written)} files -> {out}")
    return 0


def cmd_topology(args) -> int:
    from fedsim.report.graphs import draw_gallery

    out = Path(args.out)
    if args.nodes < 16 or args.nodes % 4:
        raise ConfigError(
            f"--nodes must be a multiple of 4, at least 16 (a 4-row torus), got {args.nodes}"
        )
    if out.suffix.lower() != ".png" or out.is_dir():
        raise ConfigError(f"--out must name a .png file, got {str(out)!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_gallery(out, args.nodes)
    print(f"topology gallery -> {out}")
    return 0


def main(argv=None) -> int:
    parser = _parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as err:
        print(f"fedsim: error: {err}", file=sys.stderr)
        return 2
    try:
        if args.command == "list":
            return cmd_list()
        if args.command == "run":
            return cmd_run(args)
        if args.command == "sweep":
            return cmd_sweep(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "topology":
            return cmd_topology(args)
    except ConfigError as err:
        print(f"fedsim: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        note = getattr(args, "interrupted_note", None) or {
            "run": "evaluations so far are in metrics.jsonl",
            "sweep": "finished runs are recorded; rerun the same command to resume",
        }.get(args.command, "stopped")
        print(f"fedsim: interrupted; {note}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

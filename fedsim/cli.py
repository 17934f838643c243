"""Command line: ``fedsim run | sweep | report | list`` (``fedsim --help``).

Mistakes in the input are one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from fedsim.checkpoint import Stopped
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
    sweep.add_argument(
        "--quick", action="store_true", help="the sweep's reduced form (its 'quick' block)"
    )
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
    _paper_args(sub)
    sub.add_parser("list", help="list every registered component")
    topo = sub.add_parser("topology", help="draw the peer-to-peer topologies (a PNG gallery)")
    topo.add_argument("--nodes", type=int, default=16, help="nodes per graph (default 16)")
    topo.add_argument("--out", default="topologies.png", help="PNG file (default topologies.png)")
    return parser


def _paper_args(sub) -> None:
    paper = sub.add_parser("paper", help="run the paper's experiments and write REPORT.md")
    paper.add_argument("--quick", action="store_true", help="each sweep's reduced form")
    paper.add_argument(
        "--out", default=None, help="folder (default runs/paper, runs/paper-quick with --quick)"
    )
    paper.add_argument(
        "--only", action="append", default=None, metavar="NAME", help="this experiment only"
    )
    paper.add_argument("--report-only", action="store_true", help="write REPORT.md, run nothing")
    paper.add_argument("--manifest", default="configs/paper/paper.yaml", help="experiment list")
    paper.add_argument("--quiet", action="store_true", help="no progress bars")


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
    """Several processes (hosts, or one per GPU): JAX_COORDINATOR_ADDRESS (host:port of
    process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID, or a cluster JAX detects by itself
    (SLURM, ...). Called before anything touches JAX (reading a config does), as
    ``jax.distributed.initialize`` requires."""
    if not getattr(args, "distributed", False):
        return
    import jax

    def env(name):
        text = os.environ.get(name)
        if not text:
            return None
        if not text.isdigit():
            raise ConfigError(f"--distributed: {name} must be an integer >= 0, got {text!r}")
        return int(text)

    try:
        jax.distributed.initialize(
            coordinator_address=os.environ.get("JAX_COORDINATOR_ADDRESS"),
            num_processes=env("JAX_NUM_PROCESSES"),
            process_id=env("JAX_PROCESS_ID"),
        )
    except (ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"--distributed could not join: {first} (set JAX_COORDINATOR_ADDRESS=host:port, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under SLURM)"
        ) from None


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


def _out_dir(args, cfg: dict) -> tuple[Path, bool]:
    """The run folder ``--out`` names (default ``runs/<config name>-<timestamp>``), checked,
    and whether to resume: a folder holding an unfinished run of the same config (its
    config.yaml, no summary.json) resumes from its latest checkpoint (or round 0). Refused
    when it cannot be a folder, or holds anything else and no ``--overwrite``. Writes
    nothing."""
    from fedsim.io import check_out_dir

    if args.out is not None:
        out = Path(args.out)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{Path(args.config).stem}-{stamp}"
    check_out_dir(out)
    if not (out.exists() and any(out.iterdir())) or args.overwrite:
        return out, False
    if _unfinished_run_of(out, cfg):
        return out, True
    raise ConfigError(
        f"output folder {out} is not empty; choose another --out or add --overwrite"
        + (" (it holds an unfinished run of another config)" if _unfinished(out) else "")
    )


def _unfinished(out: Path) -> bool:
    return (out / "config.yaml").is_file() and not (out / "summary.json").exists()


def _unfinished_run_of(out: Path, cfg: dict) -> bool:
    """Whether ``out`` holds an unfinished run whose config gives the same results."""
    import yaml

    from fedsim.checkpoint import config_identity

    if not _unfinished(out):
        return False
    try:
        old = yaml.safe_load((out / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(old, dict) and config_identity(old) == config_identity(cfg)


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

    from fedsim import checkpoint
    from fedsim.config import load_config, to_spec
    from fedsim.setup import components, prepare

    cfg = load_config(args.config, args.set, args.seed)
    spec, hparams = to_spec(cfg)
    out, resume = _out_dir(args, cfg)
    checkpoints = checkpoint.for_run(out / "checkpoints", cfg)
    # a checkpoint of another config or version is refused here, before anything is written
    identity = checkpoint.config_identity(cfg)
    before = checkpoint.read_meta(out / "checkpoints", identity) if resume else None
    setup = _layout(prepare(spec), args)  # may refuse (memory) before writing
    components(setup)  # checks that need the data (a subgroup's feature), before writing
    _all_processes_here("checked")
    if jax.process_index() != 0:  # process 0 writes the run folder; the others compute
        _all_processes_here("prepared")
        with checkpoint.on_sigterm(checkpoints.stop):
            _simulate(setup, hparams, cfg, None, args, checkpoints)
        return 0
    return _leader_run(setup, hparams, cfg, out, (resume, before), checkpoints, args)


def _all_processes_here(name: str) -> None:
    """With several processes, wait until each has reached this point (no-op alone)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"fedsim-run-{name}")


def _leader_run(setup, hparams, cfg, out, resume, checkpoints, args) -> int:
    """Process 0 of ``fedsim run``: prepare the folder, or take up the unfinished run in
    it (``resume``: ``(True, latest checkpoint's record or None)``), run, write."""
    import jax

    from fedsim import checkpoint
    from fedsim.config import dump
    from fedsim.io import write_atomic, write_json

    resuming, before = resume
    done = [] if before is None else before["history"][0]
    created = [p for p in (out, *out.parents) if not p.exists()]
    moved = [] if resuming or not out.exists() else _set_aside(out)
    if not resuming:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    elif before is not None:
        print(f"fedsim: resuming {out} from round {before['round']}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"  # the evaluations up to the checkpoint, no later
    write_atomic(metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in done))
    _all_processes_here("prepared")
    try:
        write_atomic(out / "config.yaml", dump(cfg))
        with checkpoint.on_sigterm(checkpoints.stop):
            summary, history = _simulate(
                setup, hparams, cfg, metrics_path, args, checkpoints, done[-1:]
            )
    except ConfigError:
        if resuming:
            raise
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
    checkpoint.remove(out / "checkpoints")
    shutil.rmtree(out / PREVIOUS, ignore_errors=True)
    _print_final(history, summary, setup, out)
    return 0


def _print_final(history, summary, setup, out) -> None:
    final = history[-1]
    main = setup.task.main_metric
    value = final.get(main)
    note = " (diverged: the model became non-finite)" if summary["diverged"] else ""
    print(
        f"round {final['round']}: {main.removeprefix('test_').replace('_', ' ')} "
        f"{value if value is None else round(value, 4)}, {final['seconds']:.1f} s{note} -> {out}"
    )


def _simulate(setup, hparams, cfg, metrics_path, args, checkpoints=None, resumed=()):
    """Run the simulation, appending each evaluation to ``metrics_path`` (None: to no
    file), resuming from and saving to ``checkpoints`` (``resumed``: the checkpoint's last
    evaluation, for the progress bar); returns the summary (without the device) and the
    history."""
    from tqdm import tqdm

    from fedsim.io import append_jsonl
    from fedsim.runner import run, summarize

    spec = setup.spec
    last = {"round": 0, "seconds": 0.0, **(resumed[-1] if resumed else {})}
    bar = tqdm(
        total=spec.rounds, initial=last["round"], unit="round", disable=args.quiet, file=sys.stderr
    )

    baseline, alone = _baseline_records(cfg)

    main = setup.task.main_metric  # test_accuracy, or test_r2 for regression
    short = main.removeprefix("test_")

    def on_eval(record):
        if record["round"] in baseline:
            record.update(compare_with_baseline(record, baseline[record["round"]], alone))
        if metrics_path is not None:
            append_jsonl(metrics_path, record)
        rate = (record["round"] - last["round"]) / max(record["seconds"] - last["seconds"], 1e-9)
        bar.update(record["round"] - last["round"])
        value = record.get(main)
        bar.set_postfix(
            {short: "nan" if value is None else f"{value:.4f}", "rounds_s": f"{rate:.1f}"}
        )
        last.update(record)

    history = run(setup, hparams, cfg["seed"], on_eval=on_eval, checkpoints=checkpoints)
    bar.close()
    summary = {
        "rounds": spec.rounds,
        **summarize(history, main),
        "n_params": setup.n_params,
        "seed": cfg["seed"],
    }
    return summary, history


def cmd_sweep(args) -> int:
    import threading

    from fedsim.checkpoint import on_sigterm
    from fedsim.sweep import load_sweep, parse_shard, run_sweep

    sweep = load_sweep(args.sweep, quick=args.quick)
    shard = parse_shard(args.shard)
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{Path(args.sweep).stem}"
    t0 = time.perf_counter()
    stop = threading.Event()
    with on_sigterm(stop):
        stats = run_sweep(
            sweep,
            out,
            shard=shard,
            memory_gb=args.memory_gb,
            mesh_devices=args.devices,
            quiet=args.quiet,
            max_batch=args.max_batch,
            stop=stop,
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


def cmd_paper(args) -> int:
    import threading

    from fedsim import paper
    from fedsim.checkpoint import on_sigterm

    exps = paper.load_manifest(args.manifest, args.only)
    out = Path(args.out or ("runs/paper-quick" if args.quick else "runs/paper"))
    t0 = time.perf_counter()
    if not args.report_only:
        stop = threading.Event()
        with on_sigterm(stop):
            paper.run_paper(exps, out, quick=args.quick, quiet=args.quiet, stop=stop)
    path = paper.write_paper_report(exps, out, quick=args.quick)
    print(f"paper: {len(exps)} experiments, {time.perf_counter() - t0:.1f} s -> {path}")
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
        _start_distributed(args)
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
        if args.command == "paper":
            return cmd_paper(args)
    except ConfigError as err:
        print(f"fedsim: error: {err}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(
            f"fedsim: stopped by SIGTERM; {stop}; rerun the same command to resume", file=sys.stderr
        )
        return 143
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

"""fedsim's figures on one GPU, each beside the device's measured peak (``bench/gpu.sh``
runs this under an 8-minute limit).

Sections, run in this order, each written when done to ``OUT/gpu_<section>.json`` with
the device's name and the machine (``bench/machine.py``):

- ``peak``: fp32 GFLOP/s of an n x n ``jnp.dot`` (``round_throughput.matmul_gflops``) and
  the GB/s of a large element-wise pass (read + write), the two peaks the figures below
  are divided by;
- ``round``: the fused round at 1,000 / 10,000 / 100,000 participating clients x 1 and 10
  local steps (MNIST, MLP 784-100-10, batch 32, FedAvg: ``round_throughput``'s set-up and
  timers; 100,000 clients use ``scale.py``'s ``mnist_shift2``), laid out by the memory
  planner; client-updates/s, and local training's GFLOP/s over the matmul peak;
- ``aggregators``: rules at n = 1,000 and 10,000 clients, d = 10^6 (``aggregators.py``'s
  rules and timer; the updates drawn on the device, 40 GB at n = 10,000): seconds, the
  GB/s of reading the [n, d] matrix once over the element-wise peak, and, for rules with
  a FLOP count (mean 2nd, Krum's Gram matrix 2n^2d), GFLOP/s over the matmul peak;
- ``peer``: the fused peer-to-peer round (8-regular, median and gossip) at 100 nodes
  against per-node Python loops (``peer.py``'s section 3: fedsim's own jitted pieces, and
  PyTorch where it is installed), where the CPU's figures are bound by the arithmetic;
- ``sweep``: 64 runs as one ``fedsim sweep`` beside separate ``fedsim run`` processes
  (``sweep.py``'s ``bench_one``), with the sweep's training GFLOP/s over the matmul peak;
- ``largest``: the largest client count, all participating, that runs (``scale.py``'s
  child, one subprocess per count, doubling until one fails or the time budget ends).

Each section runs in a process of its own (jax keeps the GPU memory a process took until
it ends). A section that fails (out of memory, a crashed or timed-out process, ...) records
its error and the next one runs; one that would start after ``--budget-s`` seconds is
recorded as skipped, one still running after ``--limit-s`` seconds is stopped; ``--sections``
picks some. ``--tiny`` runs every section at sizes a CPU finishes in a minute or two
(tests/test_bench_gpu.py), so the script cannot rot where no GPU is at hand.

    bench/gpu.sh [--tiny] [--out DIR] [--budget-s S] [--sections round,aggregators,...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT)]

import aggregators as agg_bench  # noqa: E402  (bench/ on the path first)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import machine  # noqa: E402
import peer  # noqa: E402
import round_throughput as rt  # noqa: E402
import scale  # noqa: E402
import sweep as sweep_bench  # noqa: E402

from fedsim import memory  # noqa: E402
from fedsim.types import AggContext  # noqa: E402

FULL = {
    "matmul_n": 8192,
    "copy_floats": 2**28,  # 1 GiB
    "clients": [1_000, 10_000, 100_000],
    "steps": [1, 10],
    "repeats": 3,
    "agg_sizes": [(1_000, 10**6), (10_000, 10**6)],
    "rules": ["mean", "median", "trimmed_mean", "krum", "geometric_median", "centered_clipping"],
    "peer_nodes": 100,
    "peer_rules": list(peer.LOOP_RULES),
    "sweep_rounds": 10,
    "separate": 2,
    "sweep_base": None,
    "largest": [20_000, 40_000, 80_000, 120_000],  # mnist_shift2 holds 120,000 samples
    "largest_rounds": 2,
}
TINY = {
    **FULL,
    "matmul_n": 256,
    "copy_floats": 2**20,
    "clients": [16],
    "steps": [1],
    "repeats": 1,
    "agg_sizes": [(16, 1000)],
    "rules": ["mean", "krum"],
    "peer_nodes": 20,  # the fewest nodes where an 8-regular graph is gathered, not dense
    "peer_rules": ["median"],
    "sweep_rounds": 1,
    "separate": 1,
    "sweep_base": {
        "data": {"name": "digits", "n_clients": 8, "partition": {"name": "iid"}},
        "model": {"name": "mlp", "widths": [8]},
        "client": {"participants": 4, "local_epochs": 1, "batch_size": 16},
    },
    "largest": [16],
    "largest_rounds": 1,
}
# FLOPs of one aggregation at (n, d), for rules whose work is arithmetic
NOMINAL_FLOPS = {
    "mean": lambda n, d: 2 * n * d,
    "krum": lambda n, d: 2 * n * n * d,
    "multi_krum": lambda n, d: 2 * n * n * d,
}


def copy_gbps(n_floats: int, repeats: int) -> float:
    """GB/s of ``x * 2`` over ``n_floats`` fp32 values (each read once, written once)."""
    x = jnp.ones(n_floats, jnp.float32)
    double = jax.jit(lambda x: x * 2)
    t, _ = rt.median_time(lambda: double(x).block_until_ready(), max(repeats, 3))
    return 2 * 4 * n_floats / t / 1e9


def peak(sizes: dict) -> dict:
    """The device's measured peaks: ``matmul_gflops`` and ``copy_gbps``."""
    return {
        "matmul_n": sizes["matmul_n"],
        "matmul_gflops": rt.matmul_gflops(max(sizes["repeats"], 3), sizes["matmul_n"]),
        "copy_gbps": copy_gbps(sizes["copy_floats"], sizes["repeats"]),
    }


def round_row(m: int, steps: int, repeats: int, peaks: dict) -> dict:
    """One (clients, local steps) point of the fused round; training's FLOPs count the
    samples really trained (``round_throughput``'s formula)."""
    from fedsim.data import REGISTRY

    extra = ()
    if m > scale.MNIST_TRAIN:
        if "mnist_shift2" not in REGISTRY.names():
            scale._register_shifted_mnist()
        extra = ("data.name=mnist_shift2",)
    setup, hparams = rt.make_setup(m, steps, extra=extra)
    setup, plan = memory.lay_out(setup, 1, memory.budget_bytes(None), devices=1)
    _, real = rt.client_schedule(setup)
    rounds = max(1, min(5, 5000 // (m * steps)))
    t_round = rt.time_fedsim_round(setup, hparams, repeats, rounds)
    parts = rt.time_fedsim_parts(setup, hparams, repeats)
    train_gflops = rt.FLOPS_PER_SAMPLE * int(real.sum()) / parts["train"] / 1e9
    return {
        "clients": m,
        "local_steps": steps,
        "client_chunk": plan.client_chunk,
        "seconds_per_round": t_round,
        "train_seconds": parts["train"],
        "aggregate_seconds": parts["aggregate"],
        "updates_per_s": m / t_round,
        "train_gflops": train_gflops,
        "train_fraction_of_matmul": train_gflops / peaks["matmul_gflops"],
        "round_fraction_of_matmul": train_gflops
        * parts["train"]
        / t_round
        / peaks["matmul_gflops"],
    }


def aggregator_rows(n: int, d: int, rules: list[str], repeats: int, peaks: dict) -> list:
    """Each rule once jitted on an [n, d] matrix drawn on the device."""
    f = n // 5
    x = jax.random.normal(jax.random.PRNGKey(0), (n, d), jnp.float32)
    w = jnp.ones(n)
    judge = (jnp.zeros(d), jax.random.PRNGKey(1), jnp.zeros((16, d)), jnp.zeros(16))
    made = agg_bench.ours(n, d, f)
    rows = []
    for name in rules:
        rule = made[name]
        run = jax.jit(
            lambda x, w, s, glob, key, jx, jy, rule=rule: rule.aggregate(
                x, w, s, AggContext(glob, key, {}, None, agg_bench.linear_loss, jx, jy)
            )
        )
        state = rule.init(jnp.zeros(d), n)
        row = {"rule": name, "n": n, "d": d, "f": f}
        try:
            call = lambda run=run, state=state: jax.block_until_ready(run(x, w, state, *judge))
            row["seconds"], row["compile_and_first_s"] = agg_bench.timed(call, repeats)
        except Exception as err:  # noqa: BLE001 - out of memory at one size must not stop the rest
            row["error"] = _first_line(err)
            rows.append(row)
            continue
        row["read_gbps"] = 4 * n * d / row["seconds"] / 1e9
        row["read_fraction_of_copy_peak"] = row["read_gbps"] / peaks["copy_gbps"]
        if name in NOMINAL_FLOPS:
            gflops = NOMINAL_FLOPS[name](n, d) / row["seconds"] / 1e9
            row["gflops"] = gflops
            row["fraction_of_matmul"] = gflops / peaks["matmul_gflops"]
        rows.append(row)
    return rows


def sweep_row(sizes: dict, out: Path, peaks: dict) -> dict:
    """``sweep.py``'s 64 runs (FedAvg + ALIE) as one sweep beside separate processes; the
    sweep's GFLOP/s count 6 x parameters x samples trained per round."""
    result = sweep_bench.bench_one(
        sizes["sweep_rounds"],
        sizes["separate"],
        "mean",
        base=sizes["sweep_base"],
        results=out,
        name="gpu_sweep_detail.json",
    )
    flops = 64 * sizes["sweep_rounds"] * _flops_per_round(result["config"])
    gflops = flops / result["sweep_seconds"] / 1e9
    keys = ("sweep_seconds", "runs_per_program", "separate_seconds_extrapolated", "speedup")
    return {
        **{k: result[k] for k in keys},
        "sweep_gflops": gflops,
        "sweep_fraction_of_matmul": gflops / peaks["matmul_gflops"],
    }


def _flops_per_round(doc: dict) -> float:
    """6 x parameters (biases included) x the samples a round's participants train on
    (one local epoch each, as the sweep's base sets)."""
    from fedsim.config import to_spec
    from fedsim.setup import prepare
    from fedsim.sweep import expand

    spec, _ = to_spec(expand(doc).runs[0].cfg)
    setup = prepare(spec)
    count = jax.device_get(setup.data.count)
    per_client = float(sum(count)) / len(count)
    return 6 * setup.n_params * per_client * spec.participants


def largest_rows(sizes: dict, deadline: float, peaks: dict) -> list:
    """``scale.py --child N/N`` for growing N until one fails or time runs out; when the
    memory planner refuses N and names the largest count that fits, that count is tried
    once more, so the last successful row is the largest the planner allows."""
    rows, counts, fits = [], list(sizes["largest"]), 0
    while counts:
        n = counts.pop(0)
        if time.time() > deadline:
            rows.append({"clients": n, "skipped": "time budget"})
            break
        cmd = [sys.executable, str(BENCH / "scale.py"), "--child", f"{n}/{n}"]
        cmd += ["--rounds", str(sizes["largest_rounds"])]
        left = max(deadline - time.time(), 30)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            rows.append({"clients": n, "error": f"timed out after {left:.0f} s"})
            break
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()
            rows.append({"clients": n, "error": tail[-1] if tail else f"exit {proc.returncode}"})
            planned = re.search(r"largest that fits: client\.participants=(\d+)", rows[-1]["error"])
            if planned and fits < int(planned.group(1)) < n:
                counts = [int(planned.group(1))]
                continue
            break
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        fits = n
        # every sample belongs to one client and all clients train one epoch a round
        samples = scale.MNIST_TRAIN * (2 if row["dataset"] == "mnist_shift2" else 1)
        gflops = rt.FLOPS_PER_SAMPLE * samples * row["rounds_per_s"] / 1e9
        rows.append({**row, "round_fraction_of_matmul": gflops / peaks["matmul_gflops"]})
    return rows


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def write(out: Path, section: str, payload: dict, base: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_{section}.json"
    path.write_text(json.dumps({**base, "section": section, **payload}, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


def sections(sizes: dict, out: Path, peaks: dict, deadline: float):
    """(name, thunk) of every section after ``peak``."""
    rounds = lambda: {
        "rows": [
            _guard(round_row, m, k, sizes["repeats"], peaks)
            for m in sizes["clients"]
            for k in sizes["steps"]
        ]
    }
    aggs = lambda: {
        "rows": [
            r
            for n, d in sizes["agg_sizes"]
            for r in _guard_list(aggregator_rows, n, d, sizes["rules"], sizes["repeats"], peaks)
        ]
    }
    return [
        ("round", rounds),
        ("aggregators", aggs),
        (
            "peer",
            lambda: {
                "rows": [_guard(peer.loop_row, sizes["peer_nodes"], r) for r in sizes["peer_rules"]]
            },
        ),
        ("sweep", lambda: sweep_row(sizes, out, peaks)),
        ("largest", lambda: {"rows": largest_rows(sizes, deadline, peaks)}),
    ]


def _guard(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - record the point that failed, go on
        return {"args": list(args[:2]), "error": _first_line(err)}


def _guard_list(fn, *args) -> list:
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001
        return [{"args": list(args[:2]), "error": _first_line(err)}]


SECTION_NAMES = ("round", "aggregators", "peer", "sweep", "largest")
SPAWNING = ("sweep", "largest")  # sections whose work runs in fedsim processes they start


def run_section(name: str, args) -> int:
    """One section in this process (the child side of ``main``): ``peak`` measures and
    writes the peaks; any other reads them from ``OUT/gpu_peak.json``."""
    device = jax.devices()[0]
    if device.platform == "cpu" and not args.tiny:
        print("bench/gpu.py: jax sees no GPU (make install GPU=1); --tiny runs CPU sizes")
        return 2
    sizes = TINY if args.tiny else FULL
    base = {
        "device": str(device),
        "device_kind": device.device_kind,
        "tiny": args.tiny,
        "machine": machine.machine_info(),
        "command": args.command,
    }
    if name == "peak":
        write(args.out, "peak", peak(sizes), base)
        return 0
    peaks = json.loads((args.out / "gpu_peak.json").read_text())
    peaks = {k: peaks[k] for k in ("matmul_n", "matmul_gflops", "copy_gbps")}
    base = {**base, "peaks": peaks}
    thunk = dict(sections(sizes, args.out, peaks, args.deadline))[name]
    start = time.perf_counter()
    try:
        payload = thunk()
    except Exception as err:  # noqa: BLE001
        payload = {"error": _first_line(err)}
    write(args.out, name, {**payload, "seconds": time.perf_counter() - start}, base)
    return 0


def run_child(name: str, args, timeout: float) -> tuple[int | None, str]:
    """``bench/gpu.py --section NAME`` in a fresh process, its output passed through;
    (exit code or None if it timed out, its last line on stderr)."""
    cmd = [sys.executable, __file__, "--section", name, "--out", str(args.out)]
    cmd += ["--deadline", repr(args.deadline), "--command", args.command]
    cmd += ["--tiny"] if args.tiny else []
    env = dict(os.environ)
    if name in SPAWNING:  # leave the device to the fedsim processes this one starts
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    tail: list[str] = []
    reader = threading.Thread(target=_pass_through, args=(proc.stderr, tail), daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = None
    reader.join(5)
    return code, tail[-1] if tail else ""


def _pass_through(stream, tail: list[str]) -> None:
    for line in stream:
        sys.stderr.write(line)
        if line.strip():
            tail[:] = [line.strip()]


def main(argv=None) -> int:
    """Each section in its own process, one after another: a process that used the GPU
    keeps its memory (jax's allocator holds what it took), so the next section, and the
    fedsim processes the sweep and the largest count start, would find the device full."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke sizes")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no section after")
    parser.add_argument(
        "--limit-s", type=float, default=470.0, help="stop a section still running after"
    )
    parser.add_argument(
        "--sections", default=None, help="comma-separated subset of " + ",".join(SECTION_NAMES)
    )
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)  # child side
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--command", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section is not None:
        return run_section(args.section, args)
    chosen = SECTION_NAMES if args.sections is None else tuple(args.sections.split(","))
    unknown = sorted(set(chosen) - set(SECTION_NAMES))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {SECTION_NAMES}")
    t0 = time.time()  # wall clock: the children compare the deadline with it too
    args.deadline = t0 + args.budget_s
    args.command = " ".join(["bench/gpu.py", *(argv if argv is not None else sys.argv[1:])])
    for name in ("peak", *[s for s in SECTION_NAMES if s in chosen]):
        now = time.time()
        if name != "peak" and now > args.deadline:
            _note(args.out, name, {"skipped": "time budget"})
            continue
        code, last = run_child(name, args, max(t0 + args.limit_s - now, 1.0))
        if name == "peak" and code != 0:
            return code if code is not None else 1
        if code != 0:
            why = "timed out" if code is None else f"exit {code}"
            _note(args.out, name, {"error": f"section process {why}: {last}"[:300]})
    print(f"bench/gpu.py: {time.time() - t0:.0f} s")
    return 0


def _note(out: Path, section: str, payload: dict) -> None:
    """A section that wrote nothing itself (skipped, killed, crashed): its file says why,
    with the peak file's device and machine."""
    base = json.loads((out / "gpu_peak.json").read_text())
    base = {k: base[k] for k in ("device", "device_kind", "tiny", "machine", "command")}
    write(out, section, payload, base)


if __name__ == "__main__":
    sys.exit(main())

"""Column-block width of the coordinate-wise order statistics: the median and the trimmed
mean (β = 0.1) at several client counts, each at a few block widths, beside the width
``fedsim.kernels.select_width`` picks.

Every width runs the same jitted rule body (``kernels.coordinatewise`` with
``median_block`` / ``trimmed_block``) on the same ``[n, d]`` standard-normal matrix: median
seconds of ``--repeats`` calls after a warm-up. Writes ``bench/results/select_width.json``
with the machine; prints, per size, each width's time over the best width's. ``--pool``:
a rank pair selected over a whole matrix at once against ``kernels.select`` (by blocks).

Usage: ``python bench/select_width.py [--sizes 100,79510 1000,100000] [--widths 32 64 ...]
[--quick]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from machine import machine_info  # bench/machine.py
from round_throughput import median_time

from fedsim import kernels as ops

RESULTS = Path(__file__).parent / "results" / "select_width.json"
SIZES = ("20,100000", "100,79510", "300,100000", "1000,100000", "3000,30000", "10000,10000")
WIDTHS = (32, 64, 128, 256, 1024)


def rules(n: int) -> dict:
    m, k = jnp.int32(n), jnp.int32(n // 10)
    return {
        "median": lambda xb, p: ops.median_block(xb, p, m),
        "trimmed_mean": lambda xb, p: ops.trimmed_block(xb, p, m, k),
    }


def seconds(fn, x, repeats: int) -> float:
    """Median seconds of ``fn(x)`` after a warm-up call (``round_throughput.median_time``)."""
    return median_time(lambda: jax.block_until_ready(fn(x)), repeats)[0]


def bench_size(n: int, d: int, widths, repeats: int) -> list[dict]:
    x = jax.random.normal(jax.random.PRNGKey(0), (n, d), jnp.float32)
    present = jnp.ones(n, bool)
    chosen = ops.select_width(n)
    rows = []
    for rule, block_fn in rules(n).items():
        times = {}
        for width in sorted(set(widths) | {chosen}):
            run = jax.jit(lambda x, w=width, f=block_fn: ops.coordinatewise(f, x, present, w))
            times[width] = seconds(run, x, repeats)
        best = min(times, key=times.get)
        row = {"rule": rule, "n": n, "d": d, "chosen_width": chosen, "best_width": best}
        row["seconds"] = {str(w): t for w, t in times.items()}
        row["chosen_over_best"] = times[chosen] / times[best]
        rows.append(row)
        shown = "  ".join(f"{w}:{t / times[best]:.2f}" for w, t in times.items())
        print(f"{rule:13s} n={n:<6d} d={d:<7d} chosen {chosen:<5d} best {best:<5d} {shown}")
    return rows


def bench_pool(n: int, d: int, repeats: int) -> dict:
    """A rank pair over a whole ``[n, d]`` matrix at once (as the attacks' box edges once
    did) against ``kernels.select``, which runs it by ``select_width`` blocks."""
    x = jax.random.normal(jax.random.PRNGKey(1), (n, d), jnp.float32)
    present = jnp.ones(n, bool)
    rank = jnp.array([n // 5, n - 1 - n // 5])
    whole = jax.jit(lambda x: ops.from_keys(ops.select_keys(ops.to_keys(x, present), rank)))
    blocked = jax.jit(lambda x: ops.select(x, present, rank))
    assert bool(jnp.all(whole(x) == blocked(x)))
    row = {"rule": "select (two ranks)", "n": n, "d": d, "width": ops.select_width(n)}
    row |= {"whole_s": seconds(whole, x, repeats), "blocks_s": seconds(blocked, x, repeats)}
    row["whole_over_blocks"] = row["whole_s"] / row["blocks_s"]
    print(f"select        n={n:<6d} d={d:<7d} whole / blocks {row['whole_over_blocks']:.2f}")
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), help="n,d pairs")
    parser.add_argument("--widths", nargs="*", type=int, default=list(WIDTHS))
    parser.add_argument("--pool", nargs="*", default=["1000,79510"], help="n,d pairs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.widths, args.repeats = ["20,2000", "100,2000"], [32, 128], 2
        args.pool = ["100,1000"]
    results = {"machine": machine_info(), "repeats": args.repeats, "rows": []}
    for size in args.sizes:
        n, d = (int(v) for v in size.split(","))
        results["rows"] += bench_size(n, d, args.widths, args.repeats)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for size in args.pool:
        n, d = (int(v) for v in size.split(","))
        results["rows"].append(bench_pool(n, d, args.repeats))
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

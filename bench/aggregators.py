"""Aggregator speed: fedsim's jitted rules beside ByzFL (numpy and torch inputs) and Flower.

Run ``.venv/bin/python bench/aggregators.py`` (``--quick`` for small sizes). Writes
``bench/results/aggregators.json`` and prints, per size, the median wall time of several
repeats for each implementation and the ratio fastest peer / fedsim.

Peers, measured in the same run:
- ByzFL: its top-level package imports torchvision (for its benchmark and data code), and
  no CPU torchvision build imports beside our torch. Only its aggregator modules are
  needed, so the bench registers an empty ``byzfl`` package pointing at the installed
  files and imports ``byzfl.aggregators`` from it (that module needs only numpy, scipy and
  torch). Called with numpy arrays and with torch tensors.
- Flower: ``flwr.server.strategy.aggregate``. Its package import pulls in grpc and the
  rest of Flower's server stack; when that fails, the bench loads the same file with its
  type-only imports (``FitRes``, ``ClientProxy``, ...) stubbed, which the aggregation
  functions never call.
A peer that is not installed, fails, or is predicted to take over ~60 s (or exhaust
memory) is skipped with the reason printed and recorded.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import machine  # bench/machine.py: what every results file records
import numpy as np

from fedsim.aggregators import make
from fedsim.types import AggContext

RESULTS = Path(__file__).parent / "results" / "aggregators.json"
GM_ITERS = 3  # Weiszfeld steps, equal to ByzFL's default T=3


def timed(fn, repeats):
    """Median wall time of ``repeats`` calls (after one warm-up call) and the warm-up time."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), first


# --- peers ------------------------------------------------------------------------------


def load_byzfl():
    spec = importlib.util.find_spec("byzfl")
    if spec is None:
        raise ImportError("byzfl is not installed")
    if "byzfl" not in sys.modules:
        stub = types.ModuleType("byzfl")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["byzfl"] = stub
    return importlib.import_module("byzfl.aggregators")


def load_flower():
    try:
        return importlib.import_module("flwr.server.strategy.aggregate")
    except ImportError:
        pass
    spec = importlib.util.find_spec("flwr")
    if spec is None:
        raise ImportError("flwr is not installed") from None
    path = Path(spec.submodule_search_locations[0]) / "server" / "strategy" / "aggregate.py"
    stubs = {"flwr.common": ["FitRes", "NDArray", "NDArrays", "parameters_to_ndarrays"]}
    stubs["flwr.server.client_proxy"] = ["ClientProxy"]
    saved = {name: sys.modules.get(name) for name in stubs}
    for name, attrs in stubs.items():
        module = types.ModuleType(name)
        for attr in attrs:
            setattr(module, attr, object)
        sys.modules[name] = module
    try:
        module_spec = importlib.util.spec_from_file_location("flower_aggregate", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module


def byzfl_calls(byz, n, d, f):
    """name -> (callable on an input, reason to skip or None)."""
    nnm_bytes = 4 * n * n * d  # its NNM broadcasts an [n, n, d] difference
    too_big = f"skipped: NNM builds an n*n*d array ({nnm_bytes / 2**30:.0f} GiB)"
    # with numpy inputs its Krum scores pairwise distances row by row: 73 s per call at
    # n=1000, d=1e5 (measured once, under load)
    slow = (
        "skipped (numpy only): measured 73 s per call at n=1000, d=1e5"
        if n * n * d >= 1e11
        else None
    )
    return {
        "krum": (byz.Krum(f=f), slow),
        "multi_krum": (byz.MultiKrum(f=f), slow),
        "median": (byz.Median(), None),
        "trimmed_mean": (byz.TrMean(f=f), None),
        "geometric_median": (byz.GeometricMedian(nu=1e-6, T=GM_ITERS), None),
        "meamed": (byz.Meamed(f=f), None),
        "centered_clipping": (byz.CenteredClipping(L=1, tau=1.0), None),
        "nnm": (byz.NNM(f=f), too_big if nnm_bytes > 8 * 2**30 else None),
    }


def flower_calls(flw, n, d, f):
    slow = "skipped: pure-Python pairwise loops, predicted > 60 s" if n * n * d > 2e10 else None
    return {
        "krum": (lambda r: flw.aggregate_krum(r, f, 0), slow),
        "multi_krum": (lambda r: flw.aggregate_krum(r, f, n - f), slow),
        "median": (flw.aggregate_median, None),
        "trimmed_mean": (lambda r: flw.aggregate_trimmed_avg(r, 0.2), None),
        # aggregate_bulyan pops its picks from the list it is given: pass a copy, or the
        # repeat after the warm-up sees n - theta updates and fails its n >= 4f + 3 check
        "bulyan": (
            lambda r: flw.aggregate_bulyan(list(r), f, flw.aggregate_krum, to_keep=0),
            "skipped: n-2f Krum passes of pure-Python pairwise loops, predicted > 60 s"
            if (n - 2 * f) * n * n * d > 2e10
            else None,
        ),
    }


# --- fedsim ---------------------------------------------------------------------------------


def ours(n, d, f):
    """name -> (aggregator, traced hparams)."""
    return {
        "mean": make("mean"),
        "krum": make("krum", f=f),
        "multi_krum": make("multi_krum", f=f),
        "median": make("median"),
        "trimmed_mean": make("trimmed_mean", beta=f / n),
        "geometric_median": make("geometric_median", iters=GM_ITERS),
        "meamed": make("meamed", f=f),
        "centered_clipping": make("centered_clipping", tau=1.0),
        "bulyan": make("bulyan", f=(n - 3) // 4 if n < 4 * f + 3 else f),
        "norm_bound": make("norm_bound"),
        "dnc": make("dnc", f=f),
        "foolsgold": make("foolsgold"),
        "signguard": make("signguard"),
        "nnm": make("mean", pre=[{"name": "nnm", "f": f}]),
        "nnm+trimmed_mean": make("trimmed_mean", beta=f / n, pre=["nnm"], f=f),
        "bucketing+median": make("median", pre=[{"name": "bucketing", "s": 2}]),
        "fltrust": make("fltrust"),
        "zeno": make("zeno", b=f),
    }


def linear_loss(p, x, y):
    return jnp.mean((x @ p - y) ** 2)


def bench_size(n, d, repeats, peers, only):
    f = n // 5
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((n, d), dtype=np.float32)
    x = jnp.asarray(x_np)
    w = jnp.ones(n)
    judge_x = jnp.asarray(rng.standard_normal((16, d), dtype=np.float32))
    judge = (jnp.zeros(d), jax.random.PRNGKey(0), judge_x, jnp.zeros(16))
    rows = []
    for name, agg in ours(n, d, f).items():
        if only and name not in only:
            continue
        state = agg.init(jnp.zeros(d), n)
        run = jax.jit(
            lambda x, w, s, glob, key, jx, jy, agg=agg: agg.aggregate(
                x, w, s, AggContext(glob, key, {}, None, linear_loss, jx, jy)
            )
        )
        call = lambda run=run, state=state: jax.block_until_ready(run(x, w, state, *judge))
        try:
            median, first = timed(call, repeats)
            rows.append(
                dict(
                    rule=name,
                    impl="fedsim",
                    n=n,
                    d=d,
                    f=f,
                    median_s=median,
                    compile_and_first_s=first,
                    repeats=repeats,
                )
            )
        except Exception as err:  # noqa: BLE001 - a failing rule must not stop the bench
            rows.append(dict(rule=name, impl="fedsim", n=n, d=d, f=f, note=f"failed: {err}"))
        print_row(rows[-1])
        del run
    for impl, (calls, inputs) in peers(n, d, f, x_np).items():
        for name, (fn, skip) in calls.items():
            if only and name not in only:
                continue
            row = dict(rule=name, impl=impl, n=n, d=d, f=f)
            if skip:
                row["note"] = skip
            else:
                try:
                    call = lambda fn=fn, inputs=inputs: fn(inputs)
                    row["median_s"], row["first_s"] = timed(call, repeats)
                    row["repeats"] = repeats
                except Exception as err:  # noqa: BLE001
                    row["note"] = f"failed: {type(err).__name__}: {err}"[:200]
            rows.append(row)
            print_row(row)
    # the fused round: ByzFL's NNM then trimmed mean, beside fedsim's composed rule
    if "byzfl-numpy" in peers.names and (not only or "nnm+trimmed_mean" in only):
        rows.append(byzfl_round(peers.byz, x_np, n, d, f, repeats))
        print_row(rows[-1])
    return rows


def byzfl_round(byz, x_np, n, d, f, repeats):
    row = dict(rule="nnm+trimmed_mean", impl="byzfl-numpy", n=n, d=d, f=f)
    if 4 * n * n * d > 8 * 2**30:
        row["note"] = "skipped: ByzFL NNM builds an n*n*d array"
        return row
    nnm, trim = byz.NNM(f=f), byz.TrMean(f=f)
    row["median_s"], row["first_s"] = timed(lambda: trim(nnm(x_np)), repeats)
    return row


class Peers:
    def __init__(self):
        self.reasons = {}
        self.byz = self.flw = None
        try:
            self.byz = load_byzfl()
        except Exception as err:  # noqa: BLE001
            self.reasons["byzfl"] = f"unavailable: {err}"
        try:
            self.flw = load_flower()
        except Exception as err:  # noqa: BLE001
            self.reasons["flower"] = f"unavailable: {err}"
        self.names = (["byzfl-numpy", "byzfl-torch"] if self.byz else []) + (
            ["flower"] if self.flw else []
        )

    def __call__(self, n, d, f, x_np):
        out = {}
        if self.byz is not None:
            import torch

            calls = byzfl_calls(self.byz, n, d, f)
            out["byzfl-numpy"] = (calls, x_np)
            torch_calls = {
                k: (fn, None if "numpy only" in (why or "") else why)
                for k, (fn, why) in calls.items()
            }
            out["byzfl-torch"] = (torch_calls, torch.from_numpy(x_np))
        if self.flw is not None:
            out["flower"] = (flower_calls(self.flw, n, d, f), [([row], 1) for row in x_np])
        return out


def print_row(row):
    what = f"{row['median_s']:8.3f} s" if "median_s" in row else row.get("note", "")
    print(
        f"  {row['impl']:12s} {row['rule']:18s} n={row['n']:<5d} d={row['d']:<8d} {what}",
        flush=True,
    )


def summary(rows):
    """Per (rule, n, d): fedsim time, fastest peer and the ratio peer / fedsim."""
    out = []
    keys = sorted({(r["rule"], r["n"], r["d"]) for r in rows if r["impl"] == "fedsim"})
    for rule, n, d in keys:
        mine = [r for r in rows if (r["rule"], r["n"], r["d"], r["impl"]) == (rule, n, d, "fedsim")]
        peers = [
            r
            for r in rows
            if (r["rule"], r["n"], r["d"]) == (rule, n, d)
            and r["impl"] != "fedsim"
            and "median_s" in r
        ]
        if not mine or "median_s" not in mine[0]:
            continue
        best = min(peers, key=lambda r: r["median_s"]) if peers else None
        out.append(
            dict(
                rule=rule,
                n=n,
                d=d,
                fedsim_s=mine[0]["median_s"],
                peer=best["impl"] if best else None,
                peer_s=best["median_s"] if best else None,
                speedup=best["median_s"] / mine[0]["median_s"] if best else None,
            )
        )
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", nargs="*", default=None, help="rule names to run")
    parser.add_argument("--sizes", nargs="*", default=None, help="n,d pairs, e.g. 1000,100000")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.sizes:
        sizes = [tuple(int(float(v)) for v in s.split(",")) for s in args.sizes]
    elif args.quick:
        sizes = [(50, 10_000), (100, 20_000)]
    else:
        sizes = [(100, 100_000), (1000, 100_000), (100, 1_000_000)]
    repeats = args.repeats or (3 if args.quick else 5)
    peers = Peers()
    for name, reason in peers.reasons.items():
        print(f"peer {name} {reason}")
    rows = []
    for n, d in sizes:
        print(f"n={n} d={d} f={n // 5}", flush=True)
        rows += bench_size(n, d, repeats, peers, args.only)
        write(args.out, peers, rows)  # keep what is done if a later size is cut short
    table = write(args.out, peers, rows)
    print("\nrule               n     d         fedsim s   fastest peer        peer s   speedup")
    for t in table:
        peer = f"{t['peer']:18s} {t['peer_s']:8.3f} {t['speedup']:8.1f}x" if t["peer"] else "-"
        print(f"{t['rule']:18s} {t['n']:<5d} {t['d']:<9d} {t['fedsim_s']:8.3f}   {peer}")
    print(f"wrote {args.out}")


def write(path, peers, rows):
    table = summary(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(
        machine=machine.machine_info(),
        device=str(jax.devices()[0]),
        peers=peers.reasons,
        rows=rows,
        summary=table,
    )
    path.write_text(json.dumps(payload, indent=1))
    return table


if __name__ == "__main__":
    main()

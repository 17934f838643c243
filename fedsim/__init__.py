"""fedsim: a vectorized simulator of collaborative learning under attack (see README)."""

from __future__ import annotations

import os
from importlib import metadata

# XLA:CPU in jaxlib 0.10 hands reductions to YNNPACK fusions, which run coordinate-wise
# reductions over client rows (``sum(x, axis=0)``, ALIE's std) several times slower than
# XLA's own loops, and whole MNIST rounds of 1,000 clients ran slower with them (no file in
# bench/results records the comparison: bench/round_throughput.py run with and without
# FEDSIM_XLA_TUNING=0 measures it). (The price: a row reduction of a product,
# ``sum(x * x, axis=1)``, then materialises the product; the aggregators avoid those where
# it mattered.)
# The flag only exists in jaxlib versions that have these fusions, and an unknown flag is
# fatal, so it is added for the tested versions only, before jax starts its backend, and
# never over a value the user set. FEDSIM_XLA_TUNING=0 leaves XLA_FLAGS alone.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def _tune_xla_cpu() -> None:
    if os.environ.get("FEDSIM_XLA_TUNING", "1") == "0":
        return
    try:
        major, minor = (int(v) for v in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if (major, minor) == (0, 10) and _YNN_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_YNN_FLAG}=-reduce".strip()


_tune_xla_cpu()

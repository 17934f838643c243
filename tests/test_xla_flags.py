"""What importing fedsim does to XLA: the flag it adds (see fedsim/__init__.py), set once,
only for the jaxlib versions that know it, never over the user's value, and off on request;
and that importing starts no device backend."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import pytest

FLAG = "--xla_cpu_experimental_ynn_fusion_type"
KNOWN = tuple(int(v) for v in metadata.version("jaxlib").split(".")[:2]) == (0, 10)


def flags_after_import(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FEDSIM_XLA_TUNING")}
    out = subprocess.run(
        [sys.executable, "-c", "import os, fedsim; print(os.environ.get('XLA_FLAGS', ''))"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.skipif(not KNOWN, reason="the flag is only added for jaxlib 0.10")
def test_flag_added_beside_the_users_flags():
    assert flags_after_import() == f"{FLAG}=-reduce"
    got = flags_after_import(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    assert got == f"--xla_force_host_platform_device_count=8 {FLAG}=-reduce"


def test_users_value_and_opt_out_are_respected():
    assert flags_after_import(XLA_FLAGS=f"{FLAG}=dot") == f"{FLAG}=dot"
    assert flags_after_import(FEDSIM_XLA_TUNING="0") == ""


def test_importing_fedsim_starts_no_device_backend():
    """Importing must leave the device untouched: settings read when the backend starts
    (XLA_FLAGS, GPU memory preallocation) still apply, and a parent process that only
    starts fedsim processes (bench/gpu.py, a sweep) holds no GPU memory."""
    code = (
        "import jax._src.xla_bridge as xb\n"
        "import fedsim.aggregators, fedsim.attacks, fedsim.cli, fedsim.kernels, fedsim.paper\n"
        "import fedsim.round, fedsim.runner, fedsim.setup, fedsim.sweep, fedsim.topology\n"
        "print(xb.backends_are_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""Client-axis sharding: 1 and 8 (forced host) devices give the same results, for single
runs and for a vmapped sweep group. XLA_FLAGS must be set before jax is imported, so the
8-device side runs in a subprocess."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = r"""
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax
from fedsim import runner
from fedsim.layout import client_mesh, with_layout
from fedsim.round import make_init, make_round
from fedsim.setup import prepare
from fedsim.config import load_config, to_spec
from fedsim.sweep import expand, group_runs, run_group

assert len(jax.devices()) == 8
over = ["client.participants=16", "rounds=4", "eval_every=2", "aggregator.name=median",
        "attack.name=alie", "attack.fraction=0.2"]
spec, hp = to_spec(load_config("configs/digits.yaml", over))
setup = prepare(spec)
mesh = client_mesh(None, spec.participants)
sharded = with_layout(setup, mesh=mesh)
state = jax.jit(make_init(setup))(jax.random.PRNGKey(0), hp)
hlo = jax.jit(make_round(sharded)).lower(state, hp, sharded.data).as_text()
doc = {"base": load_config("configs/digits.yaml", over),
       "grid": {"client.lr": [0.05, 0.1], "attack.z": [0.5, 1.5]}, "seeds": [0]}
(spec_g, runs, hps), = group_runs(expand(doc).runs)
setup_g = prepare(spec_g)
seeds = [r.cfg["seed"] for r in runs]
out = {"mesh": int(mesh.devices.size),
       "sharded_hlo": "[{\"clients\"}" in hlo or "devices=[8" in hlo}
if os.environ["MODE"] == "group":
    out["one"] = run_group(setup_g, hps, seeds, batch=4)
    out["eight"] = run_group(with_layout(setup_g, mesh=mesh), hps, seeds, batch=4)
else:
    out["one"] = [runner.run(setup, hp, 0)]
    out["eight"] = [runner.run(sharded, hp, 0)]
print(json.dumps(out))
"""


def _close(a, b):
    for ra, rb in zip(a, b, strict=True):
        assert ra["round"] == rb["round"]
        for k in ("test_accuracy", "test_loss", "malicious_weight", "update_norm"):
            np.testing.assert_allclose(ra[k], rb[k], rtol=1e-5, atol=1e-6)


def _compare(mode: str, n_runs: int):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MODE": mode}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mesh"] == 8 and out["sharded_hlo"]
    assert len(out["one"]) == n_runs
    for a, b in zip(out["one"], out["eight"], strict=True):
        _close(a, b)


@pytest.mark.slow
def test_sweep_group_on_one_and_eight_devices_agrees():
    _compare("group", 4)


@pytest.mark.slow
def test_single_run_on_one_and_eight_devices_agrees():
    _compare("run", 1)

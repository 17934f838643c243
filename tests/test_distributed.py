"""Real multi-process runs: two fedsim processes on this machine joined by
``--distributed`` (``jax.distributed`` with the coordinator on 127.0.0.1; CPU collectives
through gloo, jax's default CPU implementation since 0.4.3x). Each process owns one CPU
device, the mesh's ``clients`` axis spans both, so every round exchanges data between the
processes. What is tested: a two-process ``fedsim run`` writes one run folder whose
metrics equal (bitwise) the one-process run's, and a two-process sweep writes each run
exactly once (from process 0) with the one-process sweep's metrics; (slow) a two-process
run killed with ``kill -9`` in both processes, or stopped by SIGTERM to one of them,
resumes from process 0's latest checkpoint and ends bitwise equal to an uninterrupted
run. Not tested here: several hosts, GPUs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# even participants, so the client axis splits over the two processes' devices
SMALL = [
    "data.name=digits",
    "data.n_clients=12",
    "client.participants=6",
    "model.widths=[16]",
    "client.batch_size=16",
    "rounds=4",
    "eval_every=2",
]
SETS = [x for item in SMALL for x in ("--set", item)]

# a process that logs every summary.json it writes (a sweep run is written once when its
# summary is); fedsim.io imports no JAX, and the sweep module, imported by the command
# after jax.distributed starts, takes the logged write_json
LOGGING = r"""
import os, sys
import fedsim.io
from fedsim.cli import main
write = fedsim.io.write_json
def logged(path, obj):
    if os.path.basename(path) == "summary.json":
        with open(os.environ["WRITE_LOG"], "a") as fh:
            fh.write(f"{os.environ['JAX_PROCESS_ID']} {os.path.basename(os.path.dirname(path))}\n")
    return write(path, obj)
fedsim.io.write_json = logged
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two(args: list[str], tmp_path: Path) -> list[subprocess.Popen]:
    """Start ``fedsim ARGS --distributed`` as processes 0 and 1."""
    port = _free_port()
    procs = []
    for i in range(2):
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(i),
            "WRITE_LOG": str(tmp_path / "writes.txt"),
        }
        cmd = [sys.executable, "-c", LOGGING, *args, "--distributed", "--quiet"]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return procs


def _two_processes(args: list[str], tmp_path: Path, timeout: float = 240) -> list[str]:
    """Run ``fedsim ARGS --distributed`` as processes 0 and 1; returns their output."""
    procs = _start_two(args, tmp_path)
    errs = []
    try:
        for proc in procs:
            errs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill() if proc.poll() is None else None
    for proc, err in zip(procs, errs, strict=True):
        assert proc.returncode == 0, err
    # each process joined the other through gloo: the collectives really crossed processes
    assert all("connected to 1 peer ranks" in err for err in errs), errs
    return errs


def _history(folder: Path) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]


def _one_process_two_devices(sets: list[str], out: Path) -> None:
    """``fedsim run configs/digits.yaml`` in one process holding two CPU devices (the
    two-process runs' split of the clients)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    cmd = [sys.executable, "-m", "fedsim.cli", "run", "configs/digits.yaml", *sets]
    proc = subprocess.run(
        [*cmd, "--out", str(out), "--quiet"], cwd=ROOT, env=env, capture_output=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr


def test_two_process_run_equals_one_process_run(tmp_path):
    """Bitwise against one process holding two devices (the same split of the clients,
    its collectives inside the process); against one device the sums over clients
    associate otherwise (tests/test_sharding.py checks those to 1e-5)."""
    two, one = tmp_path / "two", tmp_path / "one"
    _two_processes(["run", "configs/digits.yaml", *SETS, "--out", str(two)], tmp_path)
    _one_process_two_devices(SETS, one)
    assert sorted(p.name for p in two.iterdir()) == ["config.yaml", "metrics.jsonl", "summary.json"]
    assert [r["round"] for r in _history(two)] == [2, 4]  # one writer: no line twice
    assert _history(two) == _history(one)  # every metric, bitwise


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9 both", "SIGTERM to process 1"])
def test_two_process_run_stopped_resumes_bitwise(tmp_path, how):
    """Once process 0 has saved two checkpoints, either both processes are killed with
    SIGKILL, or process 1 alone gets SIGTERM (both must agree to stop, process 0 saves,
    both exit 143). The same two-process command resumes from the latest checkpoint
    (every process reads it) and ends with an uninterrupted run's metrics, bitwise."""
    sets = [*SETS]
    for item in ("rounds=400", "eval_every=20", "checkpoint_every=50"):
        sets += ["--set", item]
    out, whole = tmp_path / "cut", tmp_path / "whole"
    args = ["run", "configs/digits.yaml", *sets, "--out", str(out)]
    procs = _start_two(args, tmp_path)
    checkpoints = out / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if len([p for p in checkpoints.glob("*") if p.name.isdigit()]) >= 2:
            break
        time.sleep(0.01)
    for proc in procs:
        assert proc.poll() is None, proc.communicate()[0]
    if how == "kill -9 both":
        for proc in procs:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    else:
        os.kill(procs[1].pid, signal.SIGTERM)
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
        assert [proc.returncode for proc in procs] == [143, 143], outputs
        assert "stopped by SIGTERM" in outputs[0] and "Traceback" not in "".join(outputs)
    assert not (out / "summary.json").exists(), "the stop should land mid-run"
    saved = max(int(p.name) for p in checkpoints.glob("*") if p.name.isdigit())
    assert 0 < saved < 400
    if how != "kill -9 both":
        assert f"checkpoint at round {saved}" in outputs[0]
    errs = _two_processes(args, tmp_path)
    assert f"resuming {out} from round {saved}" in errs[0]  # not from round 0
    _one_process_two_devices(sets, whole)
    assert [r["round"] for r in _history(out)] == list(range(20, 401, 20))  # no line twice
    assert _history(out) == _history(whole)  # every metric, bitwise
    assert not checkpoints.exists()


def test_two_process_sweep_writes_each_run_once(tmp_path):
    base = yaml.safe_load((ROOT / "configs/digits.yaml").read_text())
    doc = {"base": base, "grid": {"client.lr": [0.05, 0.1]}, "seeds": 2}
    for item in SMALL:
        key, value = item.split("=")
        doc["grid"][key] = [yaml.safe_load(value)]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = tmp_path / "two"
    _two_processes(["sweep", str(path), "--out", str(out)], tmp_path)
    writes = (tmp_path / "writes.txt").read_text().splitlines()
    ids = sorted(p.name for p in (out / "runs").iterdir())
    assert len(ids) == 4 and sorted(w.split()[1] for w in writes) == ids  # once each
    assert {w.split()[0] for w in writes} == {"0"}  # all by process 0
    for run_id in ids:
        assert [r["round"] for r in _history(out / "runs" / run_id)] == [2, 4]
    rows = (out / "results.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[0] for r in rows) == ids


@pytest.mark.parametrize(
    "env, message",
    [
        ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES must be an integer"),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "--distributed could not join"),
    ],
)
def test_distributed_without_a_coordinator_is_one_line(tmp_path, env, message):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_C", "JAX_N", "SLURM"))}
    cmd = [sys.executable, "-m", "fedsim.cli", "run", "configs/digits.yaml", "--distributed"]
    cmd += ["--out", str(tmp_path / "o")]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert not (tmp_path / "o").exists()

"""bench/gpu.sh, the GPU figures script, run on the CPU at tiny sizes so it cannot rot
(no GPU figure comes from here: the files it writes say ``"tiny": true`` and the device)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_sh(out: Path, *args: str) -> dict:
    env = {**os.environ, "PY": sys.executable, "JAX_PLATFORMS": "cpu"}
    cmd = ["bench/gpu.sh", "--tiny", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return {p.stem: json.loads(p.read_text()) for p in out.glob("gpu_*.json")}


def _check_common(files: dict) -> None:
    for name, doc in files.items():
        if name == "gpu_sweep_detail":
            continue
        assert doc["device_kind"] == "cpu" and doc["tiny"] is True, name
        assert "error" not in doc, (name, doc["error"])
    peak = files["gpu_peak"]
    assert peak["matmul_gflops"] > 0 and peak["copy_gbps"] > 0


def test_gpu_bench_round_aggregators_and_peer_on_cpu(tmp_path):
    files = _gpu_sh(tmp_path, "--sections", "round,aggregators,peer")
    assert sorted(files) == ["gpu_aggregators", "gpu_peak", "gpu_peer", "gpu_round"]
    _check_common(files)
    (row,) = files["gpu_round"]["rows"]
    assert row["clients"] == 16 and row["updates_per_s"] > 0
    assert 0 < row["train_fraction_of_matmul"] < 10
    rules = {r["rule"]: r for r in files["gpu_aggregators"]["rows"]}
    assert set(rules) == {"mean", "krum"} and all(r["seconds"] > 0 for r in rules.values())
    assert all(r["fraction_of_matmul"] > 0 for r in rules.values())
    peer_rows = {r["rule"]: r for r in files["gpu_peer"]["rows"]}
    assert set(peer_rows) == {"median"}
    for r in peer_rows.values():
        assert "error" not in r, r
        assert r["nodes"] == 20 and r["fused_s"] > 0 and r["python_loop_s"] > 0


@pytest.mark.slow  # the sweep section starts a 64-run sweep and a separate fedsim run
def test_gpu_bench_every_section_on_cpu(tmp_path):
    files = _gpu_sh(tmp_path)
    _check_common(files)
    assert files["gpu_sweep"]["speedup"] > 0 and files["gpu_sweep"]["sweep_fraction_of_matmul"] > 0
    (row,) = files["gpu_largest"]["rows"]
    assert row["clients"] == 16 and row["round_fraction_of_matmul"] > 0


def test_gpu_bench_refuses_to_run_full_sizes_on_a_cpu(tmp_path):
    env = {**os.environ, "PY": sys.executable, "JAX_PLATFORMS": "cpu"}
    cmd = ["bench/gpu.sh", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no GPU" in proc.stdout
    assert not list(tmp_path.iterdir())


def test_largest_tries_the_count_the_planner_names(monkeypatch):
    """A planner refusal naming a smaller count that fits gets one more try at that count;
    a failure without such a count ends the search."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu

    tried = []

    def fake_run(cmd, **kwargs):
        n = int(cmd[cmd.index("--child") + 1].split("/")[0])
        tried.append(n)
        if n > 30:
            err = f"ConfigError: {n} needs ...; largest that fits: client.participants=30"
            return subprocess.CompletedProcess(cmd, 1, "", err)
        row = {"clients": n, "dataset": "mnist", "rounds_per_s": 2.0}
        return subprocess.CompletedProcess(cmd, 0, json.dumps(row) + "\n", "")

    monkeypatch.setattr(gpu.subprocess, "run", fake_run)
    sizes = {"largest": [20, 40, 80], "largest_rounds": 1}
    rows = gpu.largest_rows(sizes, deadline=float("inf"), peaks={"matmul_gflops": 1.0})
    assert tried == [20, 40, 30]
    assert [r["clients"] for r in rows] == [20, 40, 30]
    assert "error" in rows[1] and rows[2]["rounds_per_s"] == 2.0
    monkeypatch.setattr(
        gpu.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "boom")
    )
    rows = gpu.largest_rows(sizes, deadline=float("inf"), peaks={"matmul_gflops": 1.0})
    assert [r.get("error") for r in rows] == ["boom"]


def test_a_section_whose_process_dies_is_recorded_and_the_next_runs(monkeypatch, tmp_path):
    """The driver runs each section in a process of its own: one that crashes or times out
    gets a file saying so, and the sections after it still run."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu

    ran = []

    def fake_child(name, args, timeout):
        ran.append(name)
        if name == "peak":
            doc = {"device": "d", "device_kind": "k", "tiny": True, "machine": {}, "command": "c"}
            (args.out / "gpu_peak.json").write_text(json.dumps(doc))
            return 0, ""
        return {"round": (-11, "Segmentation fault"), "aggregators": (None, "")}.get(name, (0, ""))

    monkeypatch.setattr(gpu, "run_child", fake_child)
    assert (
        gpu.main(["--tiny", "--out", str(tmp_path), "--sections", "round,aggregators,sweep"]) == 0
    )
    assert ran == ["peak", "round", "aggregators", "sweep"]
    crashed = json.loads((tmp_path / "gpu_round.json").read_text())
    assert crashed["error"] == "section process exit -11: Segmentation fault"
    assert crashed["device_kind"] == "k" and crashed["section"] == "round"
    hung = json.loads((tmp_path / "gpu_aggregators.json").read_text())
    assert hung["error"].startswith("section process timed out")
    assert not (tmp_path / "gpu_sweep.json").exists()  # a section that ran writes its own file


def test_an_unknown_section_is_refused_before_anything_runs(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu

    monkeypatch.setattr(gpu, "run_child", lambda *a: pytest.fail("a section ran"))
    with pytest.raises(SystemExit) as exit_:
        gpu.main(["--tiny", "--out", str(tmp_path), "--sections", "round,sweeps"])
    assert exit_.value.code == 2 and "unknown section(s) sweeps" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())

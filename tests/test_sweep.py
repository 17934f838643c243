"""Sweeps: expansion, grouping, vmapped runs equal to separate runs, resume, shards,
kill -9, and the report that merges shards."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedsim import runner
from fedsim.cli import main
from fedsim.config import load_config, to_spec
from fedsim.registry import ConfigError
from fedsim.report import make_report
from fedsim.setup import prepare
from fedsim.sweep import expand, group_runs, in_shard, load_sweep, parse_shard, run_sweep

BASE = {
    "rounds": 4,
    "eval_every": 2,
    "data": {"name": "digits", "n_clients": 12, "partition": {"name": "iid"}},
    "model": {"name": "mlp", "widths": [16]},
    "client": {"participants": 6, "batch_size": 16, "lr": 0.1},
    "server": {"optimizer": "sgd", "lr": 1.0},
    "attack": {"name": "alie", "fraction": 0.25},
}
DOC = {"base": BASE, "grid": {"client.lr": [0.05, 0.1], "attack.z": [0.5, 1.5]}, "seeds": 2}


def test_expand_grid_zip_and_seeds():
    doc = {**DOC, "zip": {"server.lr": [1.0, 0.5], "client.momentum": [0.0, 0.5]}, "seeds": [0, 7]}
    sweep = expand(doc)
    assert len(sweep.runs) == 2 * 2 * 2 * 2
    assert sweep.keys == ["client.lr", "attack.z", "server.lr", "client.momentum", "seed"]
    ids = [r.run_id for r in sweep.runs]
    assert len(set(ids)) == len(ids) and ids == [r.run_id for r in expand(doc).runs]
    for r in sweep.runs:  # zipped keys advance together; every point is applied
        assert (r.point["server.lr"], r.point["client.momentum"]) in [(1.0, 0.0), (0.5, 0.5)]
        assert r.cfg["client"]["lr"] == r.point["client.lr"]
        assert r.cfg["attack"]["z"] == r.point["attack.z"] and r.cfg["seed"] == r.point["seed"]
    # HParams-only differences share one compiled program
    assert len(group_runs(sweep.runs)) == 1
    shapes = expand({**DOC, "grid": {"client.participants": [4, 6]}})
    assert len(group_runs(shapes.runs)) == 2


def test_sweep_file_with_base_path(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "configs/digits.yaml", "grid": {"client.lr": [0.1]}}))
    sweep = load_sweep(path)
    assert len(sweep.runs) == 1 and sweep.runs[0].cfg["data"]["name"] == "digits"


@pytest.mark.parametrize(
    "doc, message",
    [
        ({**DOC, "grids": {}}, "unknown sweep key 'grids'; valid keys: base, grid, zip, seeds"),
        (
            {**DOC, "zip": {"server.lr": [1.0, 0.5], "client.momentum": [0.0]}},
            "zip lists must have equal lengths",
        ),
        ({**DOC, "grid": {"client.lr": 0.1}}, "grid.client.lr must be a non-empty list"),
        ({**DOC, "seeds": [1, 1]}, "lists a seed twice"),
        ({**DOC, "seeds": "x"}, "sweep 'seeds' must be"),
        ({**DOC, "grid": {"client.lr": [0.1, -1]}}, "sweep point client.lr=-1: client.lr must"),
        ({**DOC, "grid": {"client.lrr": [0.1]}}, "sweep key 'client.lrr': unknown key"),
        ({**DOC, "zip": {"client.lr": [0.1]}}, "sweep key 'client.lr' is set twice"),
        ({**DOC, "base": "nowhere.yaml"}, "base config 'nowhere.yaml' does not exist"),
        ([1, 2], "must hold a mapping"),
    ],
)
def test_sweep_errors_are_one_line(doc, message):
    with pytest.raises(ConfigError) as err:
        expand(doc)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_shards_are_disjoint_and_cover_the_sweep():
    ids = [r.run_id for r in expand({**DOC, "seeds": 10}).runs]
    parts = [[i for i in ids if in_shard(i, (s, 3))] for s in range(3)]
    assert sorted(sum(parts, [])) == sorted(ids) and all(parts)
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ConfigError, match="--shard expects I/K"):
            parse_shard(bad)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The 8-run sweep run as two shards into two folders."""
    root = tmp_path_factory.mktemp("sweep")
    sweep = expand(DOC)
    # max_batch=2: every call below vmaps 2 runs, so one compiled program serves them all
    stats = [
        run_sweep(sweep, root / f"part{i}", shard=(i, 2), quiet=True, max_batch=2) for i in range(2)
    ]
    return root, sweep, stats


def _files(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_vmapped_sweep_equals_separate_runs(sharded):
    root, sweep, stats = sharded
    assert sum(s["ran"] for s in stats) == 8 and all(s["groups"] == 1 for s in stats)
    run = next(r for r in sweep.runs if in_shard(r.run_id, (0, 2)))
    spec, hp = to_spec(run.cfg)
    alone = runner.run(prepare(spec), hp, run.cfg["seed"])
    folder = root / "part0" / "runs" / run.run_id
    recorded = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recorded] == [2, 4]
    for got, want in zip(recorded, alone, strict=True):
        for k in ("test_accuracy", "test_loss", "malicious_weight", "update_norm"):
            np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["point"] == run.point and summary["final"] == recorded[-1]
    assert yaml.safe_load((folder / "config.yaml").read_text()) == run.cfg


def test_one_run_per_program_is_the_lone_run_exactly(tmp_path):
    # max_batch=1 runs the program `fedsim run` uses, not a vmap over one run
    doc = {"base": {**BASE, "aggregator": {"name": "geometric_median"}}, "seeds": [3]}
    sweep = expand(doc)
    run_sweep(sweep, tmp_path, quiet=True, max_batch=1)
    (run,) = sweep.runs
    spec, hp = to_spec(run.cfg)
    alone = runner.run(prepare(spec), hp, run.cfg["seed"])
    folder = tmp_path / "runs" / run.run_id
    recorded = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    for got, want in zip(recorded, alone, strict=True):
        for k in ("test_accuracy", "test_loss", "malicious_weight", "update_norm"):
            assert got[k] == want[k], k


def test_rerun_skips_done_runs_and_runs_only_new_points(sharded, tmp_path):
    root, sweep, _ = sharded
    part0 = root / "part0"
    before = _files(part0 / "runs")
    again = run_sweep(sweep, part0, shard=(0, 2), quiet=True, max_batch=2)
    assert again["ran"] == 0 and again["skipped"] == len(list((part0 / "runs").iterdir()))
    assert _files(part0 / "runs") == before
    # The whole sweep into the shard-0 folder: only shard 1's runs are new.
    n0 = again["skipped"]
    full = run_sweep(sweep, part0, quiet=True, max_batch=2)
    assert full == {"total": 8, "skipped": n0, "ran": 8 - n0, "groups": 1}
    lines = (part0 / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + 8 and lines[0].startswith("run_id,client.lr,attack.z,seed,final_")


def test_report_merges_shard_folders(sharded, tmp_path):
    root, _, _ = sharded
    written = make_report([root / "part0", root / "part1"], tmp_path / "rep")
    names = {p.name for p in written}
    assert {"results.csv", "summary.csv", "summary.md", "curves_test_accuracy.png"} <= names
    heat = [n for n in names if n.startswith("heatmap_")]
    assert heat == ["heatmap_final_test_accuracy__client.lr__attack.z.png"]
    assert len((tmp_path / "rep" / "results.csv").read_text().splitlines()) == 1 + 8
    summary = (tmp_path / "rep" / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 4  # lr x z settings, seeds averaged
    assert all(line.split(",")[2] == "2" for line in summary[1:])  # n_seeds
    assert (tmp_path / "rep" / "curves_test_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(tmp_path / "empty")]) == 2


@pytest.mark.slow  # a real subprocess killed mid-sweep; resuming is in make test too
def test_kill_dash_9_loses_no_finished_run(tmp_path):
    doc = {
        "base": {**BASE, "rounds": 240, "eval_every": 80},
        "grid": {"client.lr": [0.05, 0.1]},
        "seeds": 3,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "fedsim.cli",
        "sweep",
        str(path),
        "--out",
        str(out),
        "--max-batch",
        "1",
        "--quiet",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + 120
    done = lambda: sorted(p.parent.name for p in out.glob("runs/*/summary.json"))
    while not done() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = done()
    assert 1 <= len(finished) < 6, "the kill should land mid-sweep"
    for name in finished:  # every recorded run is whole
        folder = out / "runs" / name
        assert json.loads((folder / "summary.json").read_text())["run_id"] == name
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["round"] for x in lines] == [80, 160, 240]
        assert yaml.safe_load((folder / "config.yaml").read_text())["rounds"] == 240
    for p in out.rglob("*"):  # no half-written file under a real name
        if p.is_file() and not p.name.startswith("."):
            text = p.read_text()
            if p.suffix == ".json":
                json.loads(text)
            elif p.suffix == ".yaml":
                yaml.safe_load(text)
    before = {n: (out / "runs" / n / "summary.json").read_text() for n in finished}
    assert main(["sweep", str(path), "--out", str(out), "--quiet"]) == 0
    assert len(done()) == 6
    assert {n: (out / "runs" / n / "summary.json").read_text() for n in finished} == before


def test_cli_sweep_bad_file_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**DOC, "zip": {"client.lr": [1]}}))
    assert main(["sweep", str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "set twice" in capsys.readouterr().err
    assert main(["sweep", str(bad), "--shard", "2/2"]) == 2


def test_run_ids_ignore_sections_that_do_not_change_results():
    """A run's id hashes what changes its results: ``checkpoint_every`` never does, and
    ``closed_loop`` only for a dataset that drives (so sweeps made before either key
    existed keep their ids and resume)."""
    import hashlib
    import json

    from fedsim.sweep import run_id

    digits = load_config("configs/digits.yaml")
    before = {k: v for k, v in digits.items() if k not in ("checkpoint_every", "closed_loop")}
    text = json.dumps(before, sort_keys=True, separators=(",", ":"), default=str)
    assert run_id(digits) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert run_id(load_config("configs/digits.yaml", ["closed_loop.episodes=9"])) == run_id(digits)
    driving = load_config("configs/driving.yaml")
    assert run_id(load_config("configs/driving.yaml", ["closed_loop.episodes=9"])) != run_id(
        driving
    )
    assert run_id(load_config("configs/driving.yaml", ["checkpoint_every=7"])) == run_id(driving)

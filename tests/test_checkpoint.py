"""Checkpoints (fedsim/checkpoint.py): a run killed with a real ``kill -9`` or stopped by
SIGTERM resumes from its latest checkpoint and ends with metrics bitwise equal to an
uninterrupted run; a sweep resumes the batch in flight; a checkpoint of another config
or fedsim version is refused with one line and exit code 2, nothing written."""

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

from fedsim import checkpoint
from fedsim.cli import main
from fedsim.config import load_config
from fedsim.registry import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DIGITS = "configs/digits.yaml"
# 1,000 rounds on digits: a few seconds once compiled, a checkpoint every 100 rounds
LONG = ["--set", "rounds=1000", "--set", "eval_every=20", "--set", "checkpoint_every=100"]


def _history(folder: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock ``seconds``."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]


def _steps(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.glob("*") if p.name.isdigit())


def _start(args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fedsim.cli", *args, "--quiet"]
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )


def _wait_for_steps(proc, folder: Path, n: int, timeout: float = 120) -> None:
    """Until ``folder`` holds ``n`` finished checkpoints (or the process ended)."""
    deadline = time.time() + timeout
    while len(_steps(folder)) < n and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()
    assert len(_steps(folder)) >= n, "no checkpoint appeared"


def sigterm_at_a_checkpoint(args: list[str], checkpoints: Path) -> str:
    """Start ``fedsim ARGS``, send SIGTERM once a batch has saved a step under
    ``checkpoints`` (``<batch>/<step>``); asserts exit code 143 and returns its stderr."""
    proc = _start(args)
    deadline = time.time() + 120
    while not list(checkpoints.glob("*/[0-9]*")) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    return proc.stderr.read().decode().strip()


def spy_on_resume(monkeypatch) -> list[int]:
    """The rounds every ``Saver.resume`` of this process resumes from (0: a fresh start)."""
    resumed = []
    resume = checkpoint.Saver.resume

    def spy(self, state, part, done, t0):
        result = resume(self, state, part, done, t0)
        resumed.append(result[2])
        return result

    monkeypatch.setattr(checkpoint.Saver, "resume", spy)
    return resumed


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(["run", DIGITS, *LONG, "--out", str(out), "--quiet"]) == 0
    assert not (out / "checkpoints").exists()  # removed once the run is whole
    return _history(out)


def test_kill_dash_9_resumes_bitwise(tmp_path, uninterrupted, capsys):
    out = tmp_path / "run"
    proc = _start(["run", DIGITS, *LONG, "--out", str(out)])
    _wait_for_steps(proc, out / "checkpoints", 2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists(), "the kill should land mid-run"
    saved = _steps(out / "checkpoints")
    assert len(saved) >= 2 and saved[-1] < 1000
    assert main(["run", DIGITS, *LONG, "--out", str(out), "--quiet"]) == 0
    resumed = capsys.readouterr().err
    assert f"resuming {out} from round {saved[-1]}" in resumed  # not from round 0
    assert _history(out) == uninterrupted  # every metric of every evaluation, bitwise
    assert not (out / "checkpoints").exists()


def test_sigterm_saves_stops_and_resumes_bitwise(tmp_path, uninterrupted, capsys):
    out = tmp_path / "run"
    proc = _start(["run", DIGITS, *LONG, "--out", str(out)])
    _wait_for_steps(proc, out / "checkpoints", 1)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    err = proc.stderr.read().decode().strip()
    assert err.count("\n") == 0 and "stopped by SIGTERM" in err and "Traceback" not in err
    stopped = _steps(out / "checkpoints")[-1]
    assert f"checkpoint at round {stopped}" in err and stopped < 1000
    assert len(_history(out)) == stopped // 20  # metrics.jsonl ends at the checkpoint
    assert main(["run", DIGITS, *LONG, "--out", str(out), "--quiet"]) == 0
    assert f"from round {stopped}" in capsys.readouterr().err
    assert _history(out) == uninterrupted


def _folder_with_checkpoint(tmp_path, cfg: dict, meta_version, monkeypatch) -> Path:
    """A run folder as a killed run leaves it: config.yaml, metrics.jsonl and one
    checkpoint at round 2 (its state: zeros of the shapes given)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (out / "metrics.jsonl").write_text('{"round": 2}\n')
    if meta_version is not None:
        monkeypatch.setattr(checkpoint, "version", lambda: meta_version)
    saver = checkpoint.for_run(out / "checkpoints", cfg).batch([0])
    saver.save({"w": np.zeros(3, np.float32)}, [[{"round": 2}]], 2, 0.5)
    monkeypatch.undo()
    return out


def _listing(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


FAST = ["--set", "rounds=4", "--set", "eval_every=2", "--set", "checkpoint_every=2"]


@pytest.mark.parametrize("what", ["version", "config"])
def test_a_checkpoint_of_another_version_or_config_is_refused(tmp_path, monkeypatch, capsys, what):
    cfg = load_config(DIGITS, [x for x in FAST if x != "--set"])
    written = {**cfg, "rounds": 6} if what == "config" else cfg
    out = _folder_with_checkpoint(
        tmp_path, written, "0.0.0" if what == "version" else None, monkeypatch
    )
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    before = _listing(out)
    assert main(["run", DIGITS, *FAST, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fedsim: error: checkpoint ")
    expected = "written by fedsim 0.0.0" if what == "version" else "belongs to another config"
    assert expected in err
    assert _listing(out) == before  # nothing written


def test_an_unfinished_run_of_another_config_is_not_taken_up(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = load_config(DIGITS, ["rounds=6", "eval_every=2"])
    (out / "config.yaml").write_text(yaml.safe_dump(other, sort_keys=False))
    assert main(["run", DIGITS, *FAST, "--out", str(out), "--quiet"]) == 2
    assert "unfinished run of another config" in capsys.readouterr().err


@pytest.mark.parametrize("value", [-1, "10", 2.5, True])
def test_checkpoint_every_is_validated(value):
    with pytest.raises(ConfigError, match=r"checkpoint_every must be an integer >= 0"):
        load_config(None, [f"checkpoint_every={json.dumps(value)}"])


def test_checkpoint_every_does_not_change_a_sweep_run_id():
    from fedsim.sweep import run_id

    a, b = load_config(None, ["checkpoint_every=5"]), load_config(None, ["checkpoint_every=50"])
    assert run_id(a) == run_id(b) and run_id(a) != run_id(load_config(None, ["rounds=70"]))


def test_sweep_resumes_the_batch_in_flight_bitwise(tmp_path, monkeypatch):
    base = yaml.safe_load((ROOT / DIGITS).read_text())
    base.update(rounds=600, eval_every=20, checkpoint_every=100)
    doc = {"base": base, "grid": {"client.lr": [0.05, 0.1]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    out, whole = tmp_path / "cut", tmp_path / "whole"
    err = sigterm_at_a_checkpoint(
        ["sweep", str(path), "--out", str(out), "--max-batch", "1"], out / "checkpoints"
    )
    assert "stopped by SIGTERM" in err
    resumed = spy_on_resume(monkeypatch)
    assert main(["sweep", str(path), "--out", str(out), "--quiet"]) == 0
    assert any(r > 0 for r in resumed), "the batch in flight should resume, not restart"
    assert not any((out / "checkpoints").iterdir())
    assert main(["sweep", str(path), "--out", str(whole), "--quiet"]) == 0
    for run in (whole / "runs").iterdir():
        assert _history(out / "runs" / run.name) == _history(run)

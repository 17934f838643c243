"""The CLI end to end on digits, and every config error path (one line, exit 2)."""

import json
import subprocess
import sys

import pytest
import yaml

from fedsim.cli import main
from fedsim.config import DEFAULTS, load_config
from fedsim.registry import ConfigError

DIGITS = "configs/digits.yaml"
FAST = ["--set", "rounds=4", "--set", "eval_every=2", "--quiet"]


def test_run_writes_config_metrics_and_summary(tmp_path):
    out = tmp_path / "run"
    assert main(["run", DIGITS, "--out", str(out), "--seed", "3", *FAST]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [2, 4]
    assert {"round", "test_accuracy", "test_loss", "seconds"} <= set(lines[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"] == lines[-1] and summary["seed"] == 3
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["seed"] == 3 and resolved["rounds"] == 4
    # the resolved config reruns to the same numbers
    again = tmp_path / "again"
    assert main(["run", str(out / "config.yaml"), "--out", str(again), "--quiet"]) == 0
    rerun = [json.loads(x) for x in (again / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_accuracy"] for r in rerun] == [r["test_accuracy"] for r in lines]


def test_list_names_every_registry(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for word in (
        "datasets:",
        "mnist",
        "partitions:",
        "dirichlet",
        "models:",
        "cnn",
        "aggregators:",
        "mean",
        "attacks:",
    ):
        assert word in text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["client.lrr=3"], "unknown key 'client.lrr'; valid keys here: batch_size"),
        (["aggregator.name=krumm"], "unknown aggregator 'krumm'; choose one of:"),
        (["model.name=resnet"], "unknown model 'resnet'; choose one of: cnn, logreg, mlp"),
        (["model.depth=3"], "unknown option model.depth for 'mlp'; valid options: widths"),
        (["data.name=cifar"], "unknown dataset 'cifar'"),
        (["data.partition.name=dirichlet", "data.partition.beta=1"], "data.partition.beta"),
        (["data.source=web"], "data.source must be 'bundled' or 'tfds'"),
        (["client.participants=5000"], "client.participants must be at most 1000"),
        (["client.local_steps=5"], "exactly one of client.local_epochs and client.local_steps"),
        (["client.lr=-1"], "client.lr must be a finite number > 0"),
        (["client.optimizer=lbfgs"], "client.optimizer must be one of sgd, momentum, adam"),
        (["rounds=0"], "rounds must be an integer >= 1"),
        (["eval_every=500"], "eval_every (500) must be at most rounds"),
        (["attack.fraction=1.5"], "attack.fraction must be a number in [0, 1)"),
        (["attack.name=nonesuch"], "unknown attack 'nonesuch'"),
        (["judge.classes=3"], "judge.classes must be null or a list"),
        (["seed=-1"], "seed must be an integer >= 0"),
    ],
)
def test_config_errors_name_the_problem(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_set_syntax_and_files(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["client.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_defaults_validate():
    assert load_config(None)["data"]["n_clients"] == DEFAULTS["data"]["n_clients"]


def test_cli_exit_code_2_and_one_line_on_stderr(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim.cli",
            "run",
            DIGITS,
            "--set",
            "aggregator.name=krumm",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "krumm" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert main(["run", DIGITS, "--out", str(out), *FAST]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == "{}"


def test_attack_fraction_survives_a_later_change_of_attack():
    cfg = load_config(None, ["attack.fraction=0.2", "attack.name=sign_flip"])
    assert cfg["attack"] == {"name": "sign_flip", "fraction": 0.2}
    cfg = load_config(None, ["data.partition.name=iid"])
    assert cfg["data"]["partition"] == {"name": "iid"}  # alpha belonged to dirichlet


def test_baseline_gives_accuracy_drop_and_proxy_is_configurable(tmp_path):
    clean = tmp_path / "clean"
    assert main(["run", DIGITS, "--out", str(clean), *FAST]) == 0
    attacked = tmp_path / "attacked"
    args = [
        "--set",
        "attack.name=sign_flip",
        "--set",
        "attack.fraction=0.3",
        "--set",
        f"baseline={clean}",
        "--set",
        "proxy.size=20",
    ]
    assert main(["run", DIGITS, "--out", str(attacked), *FAST, *args]) == 0
    base = [json.loads(x) for x in (clean / "metrics.jsonl").read_text().splitlines()]
    hit = [json.loads(x) for x in (attacked / "metrics.jsonl").read_text().splitlines()]
    for b, h in zip(base, hit, strict=True):
        assert h["accuracy_drop"] == pytest.approx(b["test_accuracy"] - h["test_accuracy"])
    assert hit[-1]["malicious_participants"] > 0
    assert hit[-1]["malicious_distance"] > hit[-1]["honest_distance"]  # sign flip sticks out
    with pytest.raises(ConfigError, match="finished run folder"):
        load_config(DIGITS, [f"baseline={tmp_path / 'nothing'}"])

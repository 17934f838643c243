"""The paper's experiments (`fedsim paper`, `make paper`): every sweep of the manifest
resolves in its full and quick forms, one tiny point of each runs, the derived metrics and
the conflict curve on synthetic records, and the paper report from a small sweep folder
with every figure written and linked."""

import json
import re
import warnings
from pathlib import Path

import pytest
from test_report import write_run

from fedsim import paper
from fedsim.cli import main
from fedsim.registry import ConfigError
from fedsim.report.data import Record, conflict_points
from fedsim.report.derived import with_collaboration_gain, with_malicious_share
from fedsim.sweep import expand, load_sweep

ROOT = Path(__file__).resolve().parents[1]

EXPERIMENTS = paper.load_manifest()
NAMES = [e.name for e in EXPERIMENTS]
# one experiment's tiny point runs in `make test`; the others under `make test-slow`
FAST = "exp6_health"


def test_manifest_lists_every_experiment_sweep():
    files = {p.name for p in Path("configs/paper").glob("exp*.yaml")}
    assert {e.sweep.name for e in EXPERIMENTS} == files
    assert len(NAMES) == len(set(NAMES)) >= 6


@pytest.mark.parametrize("exp", EXPERIMENTS, ids=NAMES)
def test_sweep_resolves_full_and_quick(exp):
    full, quick = load_sweep(exp.sweep), load_sweep(exp.sweep, quick=True)
    assert 0 < len(quick.runs) < len(full.runs)
    assert len({r.cfg["seed"] for r in quick.runs}) <= len({r.cfg["seed"] for r in full.runs})
    assert max(r.cfg["rounds"] for r in quick.runs) <= max(r.cfg["rounds"] for r in full.runs)


def _tiny_point(exp) -> list:
    """The first run of the experiment's quick form, cut to 2 rounds."""
    from fedsim.config import to_spec

    cfg = dict(load_sweep(exp.sweep, quick=True).runs[0].cfg, rounds=2, eval_every=2)
    return to_spec(cfg)


@pytest.mark.parametrize(
    "exp",
    [e if e.name == FAST else pytest.param(e, marks=pytest.mark.slow) for e in EXPERIMENTS],
    ids=NAMES,
)
def test_one_tiny_point_runs(exp):
    from fedsim import runner
    from fedsim.setup import prepare

    spec, hparams = _tiny_point(exp)
    history = runner.run(prepare(spec), hparams, seed=0)
    assert [r["round"] for r in history] == [2]
    assert history[-1]["finite"]


@pytest.mark.parametrize(
    "exp, quick",
    [(e, True) for e in EXPERIMENTS]
    + [pytest.param(e, False, marks=pytest.mark.slow) for e in EXPERIMENTS],
    ids=[f"{n}-quick" for n in NAMES] + [f"{n}-full" for n in NAMES],
)
def test_every_program_traces(exp, quick):
    """Every compiled program of the experiment's quick form (in ``make test``) and full
    form (slow) traces, one per Spec: its round's shapes are worked out without compiling
    or running, and the memory planner lays each group out within 8 GiB as the sweep
    would before running, so a setting only some points of a sweep reach (a model
    narrower than a column block, a graph only one point uses) fails here rather than
    hours into ``make paper``."""
    import jax

    from fedsim import memory
    from fedsim.round import make_init, make_round
    from fedsim.setup import prepare
    from fedsim.sweep import check_layout, group_runs

    groups = group_runs(load_sweep(exp.sweep, quick=quick).runs)
    assert groups
    for spec, runs, hparams in groups:
        setup = prepare(spec)
        check_layout(setup, len(runs), 8 * memory.GB, None, None)  # fits 8 GiB, as a sweep checks
        state = jax.eval_shape(make_init(setup), jax.random.PRNGKey(0), hparams[0])
        after, metrics = jax.eval_shape(make_round(setup), state, hparams[0], setup.data)
        assert jax.tree.structure(after) == jax.tree.structure(state), spec


def test_quick_block_mistakes_are_errors():
    doc = {"base": {"data": {"name": "digits"}}, "grid": {"client.lr": [0.1, 0.2]}}
    with pytest.raises(ConfigError, match="no 'quick' block"):
        expand(doc, quick=True)
    with pytest.raises(ConfigError, match="unknown quick key 'rounds'"):
        expand({**doc, "quick": {"rounds": 2}}, quick=True)
    with pytest.raises(ConfigError, match="quick.set key 'nope'"):
        expand({**doc, "quick": {"set": {"nope": 1}}}, quick=True)
    quick = expand(
        {**doc, "quick": {"set": {"rounds": 3, "eval_every": 1}, "grid": {"client.lr": [0.5]}}},
        None,
        True,
    )
    assert [(r.cfg["rounds"], r.cfg["client"]["lr"]) for r in quick.runs] == [(3, 0.5)]
    assert len(expand({**doc, "quick": {"seeds": 1}}).runs) == 2  # ignored without quick


@pytest.mark.parametrize(
    "argv, message",
    [
        (["paper", "--only", "nope"], "unknown experiment 'nope'; choose from exp1_"),
        (["paper", "--manifest", "missing.yaml"], "missing.yaml"),
        (["sweep", "configs/sweeps/digits.yaml", "--quick"], "--quick: the sweep has no 'quick'"),
    ],
)
def test_cli_mistakes_are_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def _rec(point: dict, seed: int, metrics: dict, history=()) -> Record:
    return Record(json.dumps([point, seed]), point, seed, metrics, list(history))


def test_collaboration_gain_against_the_local_only_run_of_the_same_attack_and_seed():
    gossip, alone = {"name": "complete"}, {"name": "isolated"}
    records = []
    for seed in (0, 1):
        for frac, acc in ((0.0, 0.8), (0.2, 0.7)):
            for topo, shift in ((gossip, 0.0), (alone, -0.1 - 0.05 * seed)):
                point = {
                    "attack.fraction": frac,
                    "topology": topo,
                    "aggregator": {"name": "gossip"},
                }
                final = {"final_test_accuracy": acc + shift, "final_group1_test_accuracy": 0.5}
                hist = [{"round": 5, "test_accuracy": acc + shift - 0.1}]
                records.append(_rec(point, seed, final, hist))
    out = with_collaboration_gain(records)
    gains = {
        (r.point["attack.fraction"], r.seed): r.metrics["final_collaboration_gain"]
        for r in out
        if r.point["topology"] == gossip
    }
    assert gains == pytest.approx({(0.0, 0): 0.1, (0.2, 0): 0.1, (0.0, 1): 0.15, (0.2, 1): 0.15})
    assert all(
        "final_collaboration_gain" not in r.metrics for r in out if r.point["topology"] == alone
    )
    first = next(r for r in out if r.point["topology"] == gossip)
    assert first.metrics["final_group1_collaboration_gain"] == 0.0
    assert first.history[0]["collaboration_gain"] == pytest.approx(0.1)
    assert with_collaboration_gain(records[:1]) == records[:1]  # no local-only run: unchanged


def test_malicious_share_per_round_and_over_rounds():
    hist = [{"round": t, "malicious_participants": m} for t, m in ((1, 1.0), (2, 3.0), (3, 2.0))]
    (r,) = with_malicious_share([_rec({"client.participants": 10}, 0, {}, hist)])
    assert [h["malicious_share"] for h in r.history] == [0.1, 0.3, 0.2]
    assert r.metrics["mean_malicious_share"] == pytest.approx(0.2)
    assert r.metrics["max_malicious_share"] == pytest.approx(0.3)
    (same,) = with_malicious_share([_rec({"attack.fraction": 0.2}, 0, {}, hist)])
    assert "mean_malicious_share" not in same.metrics


def test_conflict_curve_along_the_knob_against_honest_clients_used():
    """Tightening (smaller τ) uses fewer honest clients and stops the attack, and costs
    accuracy: the points keep that order, per α and attack fraction."""
    records = []
    for alpha in (0.1, 10.0):
        for tau, used, asr, acc in (
            (10.0, 1.0, 0.9, 0.9),
            (1.0, 0.6, 0.4, 0.8),
            (0.1, 0.1, 0.0, 0.3),
        ):
            for frac in (0.0, 0.2):
                point = {"alpha": alpha, "aggregator": {"name": "cc", "tau": tau}, "frac": frac}
                metrics = {
                    "final_honest_accepted": used * (1 if alpha > 1 else 0.5),
                    "final_honest_weight": 0.5,
                    "final_attack_success_rate": asr if frac else 0.0,
                    "final_test_accuracy": acc,
                }
                records.append(_rec(point, 0, metrics))
    points = conflict_points(records, "aggregator.tau", x="final_honest_accepted")
    assert list(points) == ["0.1, cc, 0", "0.1, cc, 0.2", "10, cc, 0", "10, cc, 0.2"]
    attacked = points["10, cc, 0.2"]
    assert [p.label for p in attacked] == ["τ=0.1", "τ=1", "τ=10"]
    assert [p.x.mean for p in attacked] == [0.1, 0.6, 1.0]
    assert [p.attack_success.mean for p in attacked] == [0.0, 0.4, 0.9]
    assert [p.accuracy.mean for p in attacked] == [0.3, 0.8, 0.9]
    assert [p.x.mean for p in points["0.1, cc, 0.2"]] == pytest.approx([0.05, 0.3, 0.5])


MANIFEST = """
experiments:
  - name: tiny
    sweep: tiny.yaml
    title: "1. A tiny experiment"
    text: It tests the report.
    report:
      x: attack
      y: aggregator
      conflict: aggregator.beta,aggregator.f
      conflict_x: [final_honest_accepted, final_honest_weight]
      along: [{x: attack, lines: aggregator, metrics: [attack_success_rate, test_accuracy]}]
      metrics: [honest_accepted]
"""


def _tiny_sweep(root: Path) -> None:
    """A sweep folder of 3 rules x 2 attacks x 2 seeds with the metrics the paper's figures
    read (success, accuracy, honest weight and honest clients used, per round)."""
    rules = [
        {"name": "mean"},
        {"name": "trimmed_mean", "beta": 0.1},
        {"name": "trimmed_mean", "beta": 0.3},
    ]
    attacks = [
        {"name": "targeted", "fraction": 0.0},
        {"name": "strategic_distance", "fraction": 0.2},
    ]
    for i, rule in enumerate(rules):
        for j, attack in enumerate(attacks):
            for seed in (0, 1):
                hist = [
                    {
                        "round": t,
                        "test_accuracy": 0.5 + 0.01 * t - 0.05 * i,
                        "attack_success_rate": 0.1 * j * (3 - i) + 0.001 * t,
                        "malicious_weight": 0.2 * j,
                        "honest_weight": 1 - 0.2 * j,
                        "honest_accepted": 1 - 0.2 * i - 0.01 * seed,
                        "test_loss": 1.0,
                        "finite": True,
                    }
                    for t in (5, 10)
                ]
                write_run(root / "tiny", {"aggregator": rule, "attack": attack}, seed, hist)


def test_paper_report_writes_and_links_every_figure(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "paper.yaml").write_text(MANIFEST)
    (tmp_path / "m" / "tiny.yaml").write_text("base: {}\n")
    _tiny_sweep(tmp_path / "out")
    exps = paper.load_manifest(tmp_path / "m" / "paper.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = paper.write_paper_report(exps, tmp_path / "out", quick=True)
    text = path.read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    pngs = sorted(
        p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")
    )
    assert sorted(linked) == pngs
    assert all((tmp_path / "out" / p).stat().st_size > 1000 for p in pngs)
    names = {Path(p).name for p in pngs}
    assert {
        "curves_attack_success_rate.png",
        "heatmap_final_attack_success_rate__aggregator__attack.png",
        "conflict_aggregator.beta_aggregator.f.png",
        "conflict_aggregator.beta_aggregator.f__final_honest_accepted.png",
        "along_attack.png",
    } <= names
    assert text.startswith("# Reproducing Raynal & Troncoso")
    assert "## 1. A tiny experiment" in text and "It tests the report." in text
    assert "#### final honest clients used" in text  # the extra table metric
    assert "2 seeds" in text and "± " in text


def test_sigterm_stops_paper_at_a_checkpoint_and_the_rerun_resumes(tmp_path, monkeypatch):
    """``fedsim paper`` stopped by SIGTERM saves the batch in flight and exits 143 with the
    one-line message, as ``fedsim sweep`` does (it used to die without a checkpoint);
    the same command then resumes that batch instead of starting it again."""
    import yaml
    from test_checkpoint import sigterm_at_a_checkpoint, spy_on_resume

    base = yaml.safe_load((ROOT / "configs/digits.yaml").read_text())
    base.update(rounds=600, eval_every=20, checkpoint_every=100)
    (tmp_path / "long.yaml").write_text(yaml.safe_dump({"base": base}))
    manifest = {"experiments": [{"name": "long", "sweep": "long.yaml", "title": "long"}]}
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump(manifest))
    out = tmp_path / "out"
    args = ["paper", "--manifest", str(tmp_path / "paper.yaml"), "--out", str(out)]
    err = sigterm_at_a_checkpoint(args, out / "long" / "checkpoints")
    assert err.count("\n") == 0 and "stopped by SIGTERM" in err and "Traceback" not in err
    resumed = spy_on_resume(monkeypatch)
    assert main([*args, "--quiet"]) == 0
    assert any(r > 0 for r in resumed), "the batch in flight should resume, not restart"
    (run,) = (out / "long" / "runs").iterdir()
    assert json.loads((run / "summary.json").read_text())["rounds"] == 600

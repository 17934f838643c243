"""`fedsim report` on small synthetic sweep folders (no simulation): labels, only swept
axes, legends and labels of the figures (matplotlib objects, not pixels), the compact
tables, the conflict curve, the CLI flags, and no warnings."""

import hashlib
import json
import warnings

import pytest

from fedsim import report
from fedsim.cli import main
from fedsim.report import make_report
from fedsim.report.data import (
    NOT_METRICS,
    Record,
    compact_table,
    conflict_points,
    fmt_stat,
    swept_axes,
)
from fedsim.report.figures import MAX_LINES, conflict_figure, curve_figure, heatmap_figure
from fedsim.report.labels import label_of

pytestmark = pytest.mark.filterwarnings("error")  # numpy or matplotlib warnings fail a test

RULES = [
    {"name": "mean"},
    {"name": "trimmed_mean", "beta": 0.1},
    {"name": "trimmed_mean", "beta": 0.3},
    {"name": "krum", "f": 2},
]
STRATEGIC = {
    "name": "strategic_distance",
    "goal": {"name": "targeted", "source": 1, "target": 7},
    "fraction": 0.2,
}
ATTACKS = [{"name": "none"}, STRATEGIC, {"name": "alie", "fraction": 0.2}]
CONFLICT = "aggregator.beta,aggregator.f"


def _history(rule: int, attack: int, seed: int) -> list[dict]:
    """Three evaluations whose values depend on the setting (so cells differ)."""
    out = []
    for t in (10, 20, 30):
        mal = 0.0 if attack == 0 else 0.05 * (rule + 1)
        rec = {
            "round": t,
            "test_accuracy": 0.5 + 0.01 * t + 0.01 * seed - 0.05 * attack,
            "test_loss": 2.0 - 0.03 * t,
            "malicious_weight": mal,
            "honest_weight": 1.0 - mal,
            "finite": True,
            "seconds": 0.1 * t,
        }
        if ATTACKS[attack] is STRATEGIC:  # only a targeted goal has a success rate
            rec["attack_success_rate"] = min(1.0, 0.1 * rule + 0.01 * t)
        out.append(rec)
    return out


def write_run(root, point: dict, seed: int, history: list[dict]) -> str:
    """One finished run in a sweep folder, laid out as ``sweep.write_run`` does."""
    full = {**point, "seed": seed}
    rid = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16]
    folder = root / "runs" / rid
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("{}\n")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    summary = {
        "run_id": rid,
        "point": full,
        "swept": [*point, "seed"],
        "seed": seed,
        "final": history[-1],
        "diverged": False,
        "best_test_accuracy": max(r["test_accuracy"] for r in history),
    }
    if "attack_success_rate" in history[-1]:
        summary["peak_attack_success_rate"] = max(r["attack_success_rate"] for r in history)
    (folder / "summary.json").write_text(json.dumps(summary, sort_keys=True))
    return rid


def rules_by_attacks(root, seeds: int, rules=RULES):
    """Sweep folder: ``aggregator`` (whole mappings) x ``attack`` (whole mappings) x seeds."""
    for (i, rule), (j, attack) in zip_product(rules, ATTACKS):
        for seed in range(seeds):
            write_run(root, {"aggregator": rule, "attack": attack}, seed, _history(i, j, seed))
    return root


def zip_product(a, b):
    return [((i, x), (j, y)) for i, x in enumerate(a) for j, y in enumerate(b)]


def records_of(folder):
    return report.load_records([folder])[1]


@pytest.fixture(scope="module", params=[1, 3], ids=["one_seed", "three_seeds"])
def built(request, tmp_path_factory):
    """A report of a 4 rules x 3 attacks sweep, built with warnings as errors (one seed:
    only the attack success rate's figures, to keep the test short)."""
    seeds = request.param
    root = rules_by_attacks(tmp_path_factory.mktemp("sweep"), seeds)
    metric = "attack_success_rate" if seeds == 1 else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = make_report([root], root / "report", metric=metric, conflict=CONFLICT)
    return root, seeds, written


@pytest.mark.parametrize(
    "value, label",
    [
        ({"name": "trimmed_mean", "beta": 0.1}, "trimmed_mean(β=0.1)"),
        ({"name": "krum", "f": 10}, "krum(f=10)"),
        (STRATEGIC, "strategic_distance(1→7, 20%)"),
        ({"name": "none"}, "none"),
        ({"name": "none", "fraction": 0.0}, "none"),
        ({"name": "targeted", "source": 1, "target": 7, "fraction": 0.25}, "targeted(1→7, 25%)"),
        ({"name": "backdoor", "target": 0, "pattern": "plus"}, "backdoor(pattern=plus, target=0)"),
        ({"name": "scaling", "goal": "backdoor", "boost": 10}, "scaling(backdoor, boost=10)"),
        ({"name": "dirichlet", "alpha": 0.5}, "dirichlet(α=0.5)"),
        (0.1, "0.1"),
        (3, "3"),
        ("median", "median"),
        ([0, 2, 3, 4, 5, 6, 8, 9], "[0,2–6,8,9]"),
        (list(range(10)), "[0–9]"),
    ],
)
def test_label_of(value, label):
    assert label_of(value) == label


def test_report_writes_every_file_and_indexes_the_figures(built):
    root, _, written = built
    names = {p.name for p in written}
    assert {"results.csv", "summary.csv", "summary.md", "REPORT.md"} <= names
    assert all(p.is_file() for p in written)
    pngs = sorted(n for n in names if n.endswith(".png"))
    assert {"curves_attack_success_rate.png", "conflict_aggregator.beta_aggregator.f.png"} <= set(
        pngs
    )
    for name in pngs:
        data = (root / "report" / name).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) < 150_000
    index = (root / "report" / "REPORT.md").read_text()
    for name in pngs:  # every figure embedded, under a one-line caption
        line = next(x for x in index.splitlines() if x.endswith(f"]({name})"))
        assert line.startswith("![") and len(line) < 300


def test_only_swept_axes_are_axes(built):
    root, seeds, written = built
    heat = sorted(p.name for p in written if p.name.startswith("heatmap_"))
    heatmaps = ["final_attack_success_rate", "final_test_accuracy"][: 1 if seeds == 1 else 2]
    assert heat == [f"heatmap_{m}__aggregator__attack.png" for m in heatmaps]
    axes = swept_axes(records_of(root))
    assert [a.key for a in axes] == ["aggregator", "attack"]
    assert axes[0].labels == ["krum(f=2)", "mean", "trimmed_mean(β=0.1)", "trimmed_mean(β=0.3)"]
    assert axes[1].labels == ["none", "alie(20%)", "strategic_distance(1→7, 20%)"]


def test_summary_md_leads_with_compact_tables(built):
    root, seeds, _ = built
    text = (root / "report" / "summary.md").read_text()
    assert text.index("## final test accuracy") < text.index("## final attack success rate")
    assert "## final malicious weight" in text and "summary.csv" in text
    tables = [b for b in text.split("\n\n") if b.startswith("| aggregator \\ attack")]
    assert len(tables) == 3  # one per metric that matters
    for block in tables:
        lines = block.strip().splitlines()
        assert len(lines) == 2 + 4  # header, rule, 4 rules
        assert all(line.count(" | ") == 3 for line in lines[:1] + lines[2:])  # 1 + 3 attacks
    asr = tables[1].splitlines()
    assert "| mean | no target | no target | 0." in asr[3]
    assert ("±" in asr[3]) == (seeds > 1)


def test_compact_table_cells():
    records = records_of_sweep(seeds=3)
    axes = swept_axes(records)
    table = compact_table(records, "final_attack_success_rate", axes[0], axes[1])
    assert len(table.cells) == 4 and all(len(row) == 3 for row in table.cells)
    none, alie, strategic = table.cells[1]  # the mean rule
    assert none.reason == alie.reason == "no target" and none.mean is None
    assert strategic.n == 3 and strategic.mean == pytest.approx(0.3)
    assert table.seeds == "3 seeds" and table.pooled == []
    # a cell no run reached, and one whose runs all diverged
    krum_none = lambda r: (
        r.point["aggregator"]["name"] == "krum" and r.point["attack"] == ATTACKS[0]
    )
    kept = [r for r in records if not krum_none(r)]
    for r in kept:
        if r.point["aggregator"]["name"] == "mean":
            r.metrics["final_test_accuracy"], r.diverged = None, True
    table = compact_table(kept, "final_test_accuracy", axes[0], axes[1])
    assert table.cells[0][0].reason == "not run" and table.cells[1][0].reason == "diverged"
    assert fmt_stat(table.cells[2][0]) == "0.810 ± 0.008"


def records_of_sweep(seeds: int, rules=RULES) -> list[Record]:
    out = []
    for (i, rule), (j, attack) in zip_product(rules, ATTACKS):
        for seed in range(seeds):
            h = _history(i, j, seed)
            metrics = {f"final_{k}": v for k, v in h[-1].items() if k not in NOT_METRICS}
            out.append(
                Record(f"{i}{j}{seed}", {"aggregator": rule, "attack": attack}, seed, metrics, h)
            )
    return out


def _legend_texts(fig) -> list[str]:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    return [t.get_text() for leg in legends for t in leg.get_texts()]


@pytest.mark.parametrize("seeds", [1, 3])
def test_curve_figure_has_legend_title_labels_and_bands(seeds):
    fig = curve_figure(records_of_sweep(seeds), "test_accuracy")
    # 12 settings > MAX_LINES: one panel per attack, one line per rule, one shared legend
    assert _legend_texts(fig) == ["krum(f=2)", "mean", "trimmed_mean(β=0.1)", "trimmed_mean(β=0.3)"]
    assert fig.legends[0].get_title().get_text() == "aggregator"
    assert [ax.get_title() for ax in fig.axes][:2] == ["attack = none", "attack = alie(20%)"]
    title = fig.get_suptitle()
    assert title.startswith("test accuracy over rounds") and f"{seeds} seed" in title
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_xlabel() for ax in axes].count("round") == min(3, len(axes))  # per column
    assert axes[0].get_ylabel() == "test accuracy (fraction correct)"
    lines = [line for ax in axes for line in ax.get_lines() if len(line.get_xdata())]
    assert len(lines) == 12 and max(len(ax.get_lines()) for ax in axes) <= MAX_LINES
    bands = sum(len(ax.collections) for ax in axes)
    assert bands == (12 if seeds > 1 else 0)


def test_curves_of_many_settings_are_small_multiples():
    rules = [{"name": "trimmed_mean", "beta": b / 100} for b in range(5, 50, 5)]  # 9 rules
    fig = curve_figure(records_of_sweep(1, rules), "test_accuracy")
    # 27 settings: 9 rules x 3 attacks; by attack would leave 9 lines a panel, so by rule
    assert [ax.get_title() for ax in fig.axes][0] == "aggregator = trimmed_mean(β=0.05)"
    assert len(fig.axes) == 9 and all(len(ax.get_lines()) == 3 for ax in fig.axes)
    assert _legend_texts(fig) == ["none", "alie(20%)", "strategic_distance(1→7, 20%)"]
    # one axis of 9 values: panels of at most MAX_LINES lines
    alone = [r for r in records_of_sweep(1, rules) if r.point["attack"]["name"] == "none"]
    fig = curve_figure(alone, "test_accuracy")
    assert [ax.get_title() for ax in fig.axes] == ["(1/2)", "(2/2)"]
    assert [len(ax.get_lines()) for ax in fig.axes] == [8, 1]


def test_curves_say_why_a_line_or_panel_is_empty():
    fig = curve_figure(records_of_sweep(1), "attack_success_rate", ["aggregator"], "attack")
    titles = {ax.get_title(): ax for ax in fig.axes}
    assert set(titles) == {
        "attack = none",
        "attack = alie(20%)",
        "attack = strategic_distance(1→7, 20%)",
    }
    assert [t.get_text() for t in titles["attack = none"].texts] == ["no target"]
    # panels by rule, lines by attack: the attacks without a target are legend entries
    fig = curve_figure(records_of_sweep(1), "attack_success_rate", ["attack"], "aggregator")
    assert _legend_texts(fig) == [
        "none: no target",
        "alie(20%): no target",
        "strategic_distance(1→7, 20%)",
    ]
    assert len(titles["attack = strategic_distance(1→7, 20%)"].get_lines()) == 4


def test_heatmap_shows_values_range_and_why_cells_are_empty():
    records = records_of_sweep(3)
    rows, cols = swept_axes(records)
    fig = heatmap_figure(compact_table(records, "final_attack_success_rate", rows, cols))
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts.count("no target") == 8 and "0.40\n±0.00" in texts
    assert ax.images[0].get_clim() == (0.0, 1.0)
    assert ax.get_xlabel() == "attack" and ax.get_ylabel() == "aggregator"
    assert [t.get_text() for t in ax.get_yticklabels()][0] == "krum(f=2)"
    assert fig.axes[1].get_ylabel().startswith("final attack success rate")
    assert "3 seeds" in fig.get_suptitle()


def _record(rule: dict, attack: dict, seed: int, hw, asr) -> Record:
    metrics = {"final_honest_weight": hw, "final_test_accuracy": 0.9}
    if asr is not None:
        metrics["final_attack_success_rate"] = asr
    return Record(
        f"{rule}{attack}{seed}", {"aggregator": rule, "attack": attack}, seed, metrics, []
    )


def test_conflict_points_group_by_rule_along_the_knob():
    records = []
    for seed in (0, 1):
        for beta, hw, asr in [(0.3, 0.9, 0.1), (0.1, 0.8, 0.5), (0.2, 0.85, 0.3)]:
            rule = {"name": "trimmed_mean", "beta": beta}
            records.append(_record(rule, STRATEGIC, seed, hw + 0.02 * seed, asr))
        for f, hw, asr in [(10, 0.6, 0.9), (2, 0.7, 0.6)]:
            records.append(_record({"name": "krum", "f": f}, STRATEGIC, seed, hw, asr))
        records.append(_record({"name": "mean"}, STRATEGIC, seed, 0.5, 0.95))  # no knob
        records.append(_record({"name": "krum", "f": 2}, {"name": "none"}, seed, 1.0, None))
    points = conflict_points(records, "aggregator.beta,aggregator.f")
    assert list(points) == [
        "krum, strategic_distance(1→7, 20%)",
        "trimmed_mean, strategic_distance(1→7, 20%)",
    ]  # krum under no attack has no success rate: no point
    tm = points["trimmed_mean, strategic_distance(1→7, 20%)"]
    assert [p.label for p in tm] == ["β=0.1", "β=0.2", "β=0.3"]
    assert [p.attack_success.mean for p in tm] == [0.5, 0.3, 0.1]
    assert tm[0].x.mean == pytest.approx(0.81) and tm[0].x.n == 2
    assert [p.label for p in points["krum, strategic_distance(1→7, 20%)"]] == ["f=2", "f=10"]
    # grouped by the attack only, along one knob
    only = conflict_points(records, ["aggregator.f"], group_keys=["attack"])
    assert list(only) == ["strategic_distance(1→7, 20%)"]
    fig = conflict_figure(points, "aggregator.beta,aggregator.f")
    ax = fig.axes[0]
    assert {t.get_text() for t in ax.texts} == {"β=0.1", "β=0.2", "β=0.3", "f=2", "f=10"}
    assert ax.get_xlabel().startswith("final honest weight")
    assert ax.get_ylabel().startswith("final attack success rate")
    assert len(_legend_texts(fig)) == 2


def test_flags_choose_the_heatmap_and_the_metric(tmp_path):
    root = rules_by_attacks(tmp_path / "sweep", 1)
    written = make_report(
        [root], tmp_path / "rep", x="aggregator", y="attack", metric="malicious_weight"
    )
    pngs = sorted(p.name for p in written if p.suffix == ".png")
    assert pngs == [
        "curves_malicious_weight.png",
        "heatmap_final_malicious_weight__attack__aggregator.png",
    ]
    text = (tmp_path / "rep" / "summary.md").read_text()
    assert "| attack \\ aggregator | krum(f=2) | mean |" in text


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--x", "aggregator.bet"],
            "unknown --x 'aggregator.bet'; swept keys: aggregator, attack, ",
        ),
        (["--metric", "acc"], "unknown --metric 'acc'; choose one of test_accuracy, "),
        (["--conflict", "beta"], "unknown --conflict 'beta'; swept keys: "),
        (["--x", "attack", "--y", "attack"], "--x and --y name the same key 'attack'"),
    ],
)
def test_cli_flag_mistakes_are_one_line(tmp_path, capsys, flags, message):
    root = rules_by_attacks(tmp_path / "sweep", 1)
    assert main(["report", str(root), "--out", str(tmp_path / "rep"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "rep").exists()


def test_cli_progress_line_for_large_folders(tmp_path, capsys, monkeypatch):
    root = tmp_path / "sweep"
    for seed in range(3):
        write_run(root, {"client.lr": 0.1}, seed, _history(0, 0, seed))
    monkeypatch.setattr(report, "PROGRESS_MIN_RUNS", 3)
    assert main(["report", str(root), "--metric", "test_loss"]) == 0
    out, err = capsys.readouterr()
    assert "report: reading runs" in err and "Warning" not in err
    assert out.strip().endswith(str(root / "report"))
    # no swept axis with two values: one table of all runs
    assert (
        "| all runs | 0.810 ± 0.008 | 1.100 ± 0.000 |"
        in (root / "report" / "summary.md").read_text()
    )
    assert main(["report", str(root), "--conflict", "client.lr"]) == 2  # no targeted attack
    assert "--conflict client.lr: no run with that knob has both" in capsys.readouterr().err

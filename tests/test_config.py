"""Config reading and validation: YAML as people write it, checks that used to be missed,
and traced options of pre-aggregation stages (a new clip_norm does not recompile)."""

from pathlib import Path

import pytest
import yaml
from digits_runs import SMALL_DIGITS

from fedsim import runner
from fedsim.config import dump, load_config, parse_override, parse_yaml, to_spec
from fedsim.registry import ConfigError
from fedsim.round import TRACE_COUNT
from fedsim.setup import prepare
from fedsim.sweep import expand, group_runs, load_sweep

SMALL = [*SMALL_DIGITS, "client.participants=6", "rounds=2", "eval_every=2"]


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-3", 0.001),
        ("5e2", 500.0),
        ("1E+3", 1000.0),
        ("-2.5e-1", -0.25),
        (".5e1", 5.0),
        ("1.0e3", 1000.0),
        ("0.1", 0.1),
        ("3", 3),
        ("e3", "e3"),
        ("1e", "1e"),
        (".nan", "nan"),
    ],
)
def test_numbers_people_write_are_numbers(text, value):
    got = parse_yaml(text, "x")
    if value == "nan":
        assert got != got
    else:
        assert got == value and type(got) is type(value)


def test_scientific_notation_in_files_and_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("client: {lr: 1e-3}\nserver:\n  lr: 5e2\n")
    cfg = load_config(path, ["server.momentum=1e-1"])
    assert cfg["client"]["lr"] == 0.001 and cfg["server"]["lr"] == 500.0
    assert cfg["server"]["momentum"] == 0.1
    assert parse_override("client.lr=2e-2") == ("client.lr", 0.02)
    assert parse_yaml(dump(cfg), "the dump") == cfg  # and they survive the resolved config


def test_duplicate_keys_are_refused_with_their_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 4\nclient:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"line 4: duplicate key 'lr'"):
        load_config(path)
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        load_config(None, ["aggregator={name: median, name: krum}"])
    # YAML merge keys are not duplicates: the explicit key overrides the merged one
    assert parse_yaml("a: &a {x: 1, y: 2}\nb: {<<: *a, x: 3}\n", "m")["b"] == {"x": 3, "y": 2}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["client=5"], "client must be a mapping of its keys (batch_size,"),
        (["data=3"], "data must be a mapping of its keys"),
        (["aggregator=krum"], "aggregator must be a mapping with a 'name'"),
        (["model.widths=[-5]"], "model.widths must be a list of integers >= 1, got [-5]"),
        (["model.name=cnn", "model.hidden=0"], "model.hidden must be an integer >= 1"),
        (["client.lr=.nan"], "client.lr must be a finite number > 0, got nan"),
        (["server.lr=.inf"], "server.lr must be a finite number > 0, got inf"),
        (["client.momentum=.nan"], "client.momentum must be a finite number >= 0"),
        (["attack.fraction=.nan"], "attack.fraction must be a number in [0, 1)"),
        (["aggregator={name: krum, f: -1}"], "aggregator.f (the number of clients to tolerate)"),
        (["aggregator={name: krum, f: 1.5}"], "aggregator.f must be an integer, got 1.5"),
        (["aggregator={name: geometric_median, nu: .nan}"], "aggregator.nu must be a finite"),
        (["attack={name: sign_flip, scale: .inf}"], "attack.scale must be a finite number"),
        (["data.partition.alpha=.nan"], "data.partition.alpha must be a finite number"),
        (["aggregator={name: krum, f: 4}"], "aggregator 'krum': needs n > 2f + 2 (n=6, f=4)"),
        (["aggregator={name: bulyan, f: 1}"], "aggregator 'bulyan': needs n >= 4f + 3 (n=6, f=1)"),
        (
            ["aggregator={name: krum, f: 1, pre: [{name: bucketing, s: 2}]}"],
            "needs n > 2f + 2 (n=3, f=1); n is the rows its pre stages make",
        ),
        (["aggregator.name=fltrust"], "aggregator 'fltrust' judges updates on data the server"),
        (
            ["aggregator={name: trimmed_mean, beta: 0.7}"],
            "aggregator 'trimmed_mean': beta must be in [0, 0.5), got 0.7",
        ),
        (["attack={name: targeted, source: -1}"], "attack 'targeted': option 'source'"),
        (["aggregator.pre=[nope]"], "unknown pre-aggregation stage 'nope'"),
        (["aggregator.pre=clip"], "aggregator.pre must be a list of stages"),
        (["aggregator.pre=[{name: clip, radius: 1}]"], "unknown option aggregator.pre[0].radius"),
        (["aggregator.pre=[nnm]", "aggregator.g=1"], "unknown option aggregator.g for 'mean'"),
    ],
)
def test_bad_values_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*SMALL, *overrides])
    text = str(err.value)
    assert message in text and "\n" not in text
    head = text.split(":")[0]
    assert text.count(head) == 1, "the prefix is not repeated"


def test_valid_neighbours_still_pass():
    for ok in (
        ["aggregator={name: krum, f: 1}"],  # 6 > 2*1 + 2
        ["aggregator={name: bulyan, f: 0}"],
        ["aggregator={name: krum, f: 0, pre: [{name: bucketing, s: 2}]}"],
        ["aggregator={name: fltrust}", "judge.size=20"],
        ["aggregator={name: trimmed_mean, beta: 0.1, f: 1, pre: [nnm]}"],
        ["model.widths=[]"],
        ["client.momentum=0"],
        ["data.partition.alpha=1"],
        # a component's own options may replace a mapping by a name
        ["attack={name: strategic_distance, goal: {name: targeted}}", "attack.goal=backdoor"],
    ):
        load_config(None, [*SMALL, *ok])


def test_empty_or_directory_config_files(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="is empty; write config keys into it"):
        load_config(empty)
    with pytest.raises(ConfigError, match="is a directory, not a YAML file"):
        load_config(tmp_path)


def test_pre_stage_traced_options_go_to_hparams():
    by_mapping = [*SMALL, "aggregator.pre=[{name: clip, clip_norm: 0.5}]"]
    by_name = [*SMALL, "aggregator.pre=[clip]", "aggregator.clip_norm=0.5"]
    for over in (by_mapping, by_name):
        spec, hp = to_spec(load_config(None, over))
        assert float(hp.agg["clip_norm"]) == 0.5
        assert "clip_norm" not in str(spec.aggregator_kw)
    # a sweep over clip_norm is one compiled group
    doc = {
        "base": load_config(None, SMALL),
        "grid": {"aggregator.pre": [[{"name": "clip", "clip_norm": c}] for c in (0.1, 1.0)]},
    }
    assert len(group_runs(expand(doc).runs)) == 1


def test_new_clip_norm_does_not_trace_again():
    def history(clip_norm):
        clip = f"aggregator.pre=[{{name: clip, clip_norm: {clip_norm}}}]"
        over = [*SMALL, "rounds=1", "eval_every=1", clip]
        spec, hp = to_spec(load_config(None, over))
        return spec, runner.run(prepare(spec), hp, seed=0)

    spec_a, tight = history(0.001)
    traced = TRACE_COUNT["round"]
    spec_b, loose = history(100.0)
    assert spec_a == spec_b
    assert TRACE_COUNT["round"] == traced
    assert tight[-1]["update_norm"] < loose[-1]["update_norm"]  # the value reached the stage


def test_a_renamed_nested_component_replaces_the_old_one():
    """A goal given with another name is another goal: the old goal's options do not leak
    into it (a backdoor goal would otherwise inherit targeted's 'source')."""
    cfg = load_config(
        None,
        [
            "attack.name=strategic_distance",
            "attack.goal={name: targeted, source: 1, target: 7}",
            "attack.goal={name: backdoor, target: 7}",
        ],
    )
    assert cfg["attack"]["goal"] == {"name": "backdoor", "target": 7}
    cfg = load_config(
        None,
        [
            "attack.name=strategic_distance",
            "attack.goal={name: targeted, source: 1, target: 7}",
            "attack.goal={target: 3}",
        ],
    )  # no name: the same goal, its options merged
    assert cfg["attack"]["goal"] == {"name": "targeted", "source": 1, "target": 3}


CONFIGS = sorted(p for p in Path("configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p) for p in CONFIGS])
def test_every_shipped_config_validates(path):
    """Each config and sweep the project ships passes validation as written (every sweep
    point too), so an example in the README never fails on its first line."""
    if path == Path("configs/paper/paper.yaml"):  # the experiments' manifest
        from fedsim.paper import load_manifest

        assert load_manifest(path)
    elif "grid" in yaml.safe_load(path.read_text()):  # a sweep
        assert load_sweep(path).runs
    else:
        assert load_config(str(path), [])["rounds"] >= 1

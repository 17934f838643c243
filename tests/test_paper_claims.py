"""The paper's claim 1 on `digits`, through the whole engine (Raynal & Troncoso,
arXiv 2402.13700): a strategic adversary that projects its targeted update into the
region a distance-based rule accepts reaches a higher attack success rate than the same
goal pursued without projection, and the rule keeps giving it weight. The classic
untargeted attacks visibly lower the accuracy of the plain mean.
"""

import numpy as np
import pytest
from digits_runs import run_digits

BASE = ["rounds=12", "eval_every=4"]
GOAL = "{name: targeted, source: 1, target: 7}"
RULES = {"krum": ["aggregator.f=4"], "median": [], "trimmed_mean": ["aggregator.beta=0.2"]}


def _run(*overrides):
    return run_digits(*BASE, *overrides)


@pytest.mark.parametrize("rule", list(RULES))
def test_strategic_projection_beats_the_unprojected_goal(rule):
    rule_opts = [f"aggregator.name={rule}", *RULES[rule]]
    strategic = _run(*rule_opts, "attack.name=strategic_distance", f"attack.goal={GOAL}")
    plain = _run(*rule_opts, "attack.name=targeted", "attack.source=1", "attack.target=7")
    success = lambda hist: np.mean([r["attack_success_rate"] for r in hist])
    assert success(strategic) > success(plain) + 0.1
    assert min(r["malicious_weight"] for r in strategic) > 0.0


@pytest.fixture(scope="module")
def clean_accuracy():
    return _run("attack.name=none", "attack.fraction=0.0")[-1]["test_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "attack",
    ["sign_flip", "gaussian", "scaling", "alie", "ipm", "fang", "min_max", "min_sum", "mimic"],
)
def test_classic_attacks_lower_the_accuracy_of_mean(attack, clean_accuracy):
    attacked = _run("aggregator.name=mean", f"attack.name={attack}")[-1]["test_accuracy"]
    assert attacked < clean_accuracy - 0.05


def test_sign_flip_lowers_the_accuracy_of_mean(clean_accuracy):
    attacked = _run("aggregator.name=mean", "attack.name=sign_flip")[-1]["test_accuracy"]
    assert attacked < clean_accuracy - 0.05

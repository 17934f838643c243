"""Attacks through the whole engine on the `digits` dataset (seconds per run).

The strategic adversary (PAPER.md, claim 1) against Krum: it stays selected round after
round and so reaches its targeted goal, where the same goal pursued without projection
is rejected.
"""

import pytest
from digits_runs import run_digits

BASE = [
    "client.momentum=0.0",
    "server.momentum=0.0",
    "rounds=12",
    "eval_every=1",
    "aggregator.name=krum",
    "aggregator.f=4",
]
GOAL = "{name: targeted, source: 1, target: 7}"


def _run(attack, *options):
    return run_digits(*BASE, f"attack.name={attack}", *options)


@pytest.mark.slow
def test_strategic_distance_stays_selected_by_krum_and_succeeds():
    history = _run("strategic_distance", f"attack.goal={GOAL}")
    weights = [r["malicious_weight"] for r in history]
    assert sum(weights) / len(weights) > 0.9
    assert max(r["attack_success_rate"] for r in history[-3:]) > 0.5


@pytest.mark.slow
def test_unprojected_goal_is_rejected_by_krum():
    history = _run("targeted", "attack.source=1", "attack.target=7")
    assert all(r["malicious_participants"] == 4 for r in history)
    assert max(r["malicious_weight"] for r in history) < 0.5
    assert history[-1]["attack_success_rate"] < 0.3

"""The Task seam: classification and regression metrics against numpy, and the two
bundled scikit-learn sets through the whole engine (float features, a binary task and a
regression task), clean and under a robust rule with an attack."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from fedsim import runner
from fedsim import task as tasks
from fedsim.cli import main
from fedsim.config import load_config, to_spec
from fedsim.setup import prepare

_rng = np.random.default_rng(0)


def test_classification_metrics_match_numpy():
    logits = _rng.normal(size=(50, 3)).astype(np.float32)
    y = _rng.integers(0, 3, 50).astype(np.int32)
    got = tasks.make(3).metrics(jnp.asarray(logits), jnp.asarray(y))
    shifted = logits - logits.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    assert float(got["test_accuracy"]) == pytest.approx(np.mean(logits.argmax(1) == y))
    assert float(got["test_loss"]) == pytest.approx(-logp[np.arange(50), y].mean(), rel=1e-5)


def test_regression_metrics_match_numpy():
    out = _rng.normal(size=(40, 1)).astype(np.float32)
    y = _rng.normal(size=40).astype(np.float32)
    task = tasks.make(0)
    assert task.kind == "regression" and task.n_outputs == 1 and task.main_metric == "test_r2"
    got = task.metrics(jnp.asarray(out), jnp.asarray(y))
    err = out[:, 0].astype(np.float64) - y
    assert float(got["test_mse"]) == pytest.approx(np.mean(err**2), rel=1e-5)
    assert float(got["test_mae"]) == pytest.approx(np.mean(np.abs(err)), rel=1e-5)
    assert float(got["test_r2"]) == pytest.approx(1 - np.mean(err**2) / np.var(y), rel=1e-5)
    mask = (np.arange(40) < 10).astype(np.float32)
    loss = task.loss(jnp.asarray(out), jnp.asarray(y), jnp.asarray(mask))
    assert float(loss) == pytest.approx(np.mean(err[:10] ** 2), rel=1e-5)


def _final(config, *overrides):
    spec, hp = to_spec(load_config(config, list(overrides)))
    return runner.run(prepare(spec), hp, seed=0)[-1]


def test_breast_cancer_through_the_engine():
    assert _final("configs/breast_cancer.yaml")["test_accuracy"] >= 0.93


@pytest.mark.slow
def test_breast_cancer_under_attack_through_the_engine():
    attacked = _final(
        "configs/breast_cancer.yaml",
        "aggregator={name: trimmed_mean, beta: 0.2}",
        "attack={name: targeted, source: 0, target: 1, fraction: 0.2}",
    )
    assert attacked["finite"] and 0.0 <= attacked["attack_success_rate"] <= 1.0
    assert attacked["malicious_participants"] == 2


def test_diabetes_regression_through_the_engine(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "configs/diabetes.yaml", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["test_r2"] >= 0.4 and summary["best_test_r2"] >= 0.4
    assert {"test_mse", "test_mae", "test_loss"} <= set(summary["final"])
    assert "test_accuracy" not in summary["final"]
    attacked = _final(
        "configs/diabetes.yaml", "aggregator.name=median", "attack={name: alie, fraction: 0.2}"
    )
    assert attacked["finite"] and attacked["malicious_participants"] == 2


def test_heart_federation_matches_central_logistic_regression():
    """The health task through the engine: FedAvg over the four hospitals reaches the
    accuracy of scikit-learn's logistic regression trained centrally on the same split
    (within 0.03), and reports each hospital's own test accuracy."""
    from fedsim.data.baselines import central_logistic
    from fedsim.data.tabular import load_tabular

    heart = load_tabular("heart")
    central, _ = central_logistic(heart.x_train, heart.y_train, heart.x_test, heart.y_test)
    final = _final("configs/health.yaml")
    assert abs(final["test_accuracy"] - central) <= 0.03, (final["test_accuracy"], central)
    groups = [final[f"group{g}_test_accuracy"] for g in range(4)]
    counts = np.bincount(heart.groups_test, minlength=4)
    assert np.dot(groups, counts) / counts.sum() == pytest.approx(final["test_accuracy"], 1e-5)


HEALTH_GOAL = "{name: subgroup, feature: trestbps, at_least: 140, source: 1, target: 0}"


def test_health_goal_is_exactly_the_papers_subgroup():
    """The subgroup goal, written in raw units (resting blood pressure >= 140, diseased),
    picks through the data's own standardisation exactly the patients the loader marks
    (192 across the four hospitals), in both splits; poisoning relabels only them."""
    import jax

    from fedsim.setup import components

    spec, _ = to_spec(load_config("configs/health.yaml", [f"attack={HEALTH_GOAL}"]))
    setup = prepare(spec)
    _, attack = components(setup)
    heart = setup.meta["tabular"]
    assert heart.goal_train.sum() + heart.goal_test.sum() == 192
    for x, y, goal in (
        (heart.x_train, heart.y_train, heart.goal_train),
        (heart.x_test, heart.y_test, heart.goal_test),
    ):
        _, poisoned = attack.poison(jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0), {})
        np.testing.assert_array_equal(np.asarray(poisoned) != y, goal)
    always_healthy = lambda x: jnp.tile(jnp.array([[1.0, 0.0]]), (x.shape[0], 1))
    rates = attack.success(always_healthy, jnp.asarray(heart.x_test), jnp.asarray(heart.y_test))
    rest = ~heart.goal_test
    assert float(rates["attack_success_rate"]) == 1.0
    assert float(rates["accuracy_rest"]) == pytest.approx(np.mean(heart.y_test[rest] == 0))


def test_a_subgroup_needs_a_feature_the_data_has():
    from fedsim.registry import ConfigError
    from fedsim.setup import components

    goal = "{name: subgroup, feature: pressure, at_least: 140, source: 1, target: 0}"
    spec, _ = to_spec(load_config("configs/health.yaml", [f"attack={goal}"]))
    with pytest.raises(ConfigError, match="must name an input feature .*trestbps"):
        components(prepare(spec))

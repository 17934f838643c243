"""The driving fleet: generator, labels, cache, and the closed-loop evaluator."""

import sys

import numpy as np
import pytest

from fedsim.data import closed_loop as cl
from fedsim.data import driving as drv
from fedsim.data.group_partition import partition_groups
from fedsim.data.tabular import load_tabular
from fedsim.registry import ConfigError

SMALL = {"n_cars": 4, "steps": 150, "test_steps": 50}  # 800 samples, well under a second


@pytest.fixture(scope="module")
def track():
    return cl.track_and_observer()[0]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDSIM_CACHE", str(tmp_path_factory.mktemp("cache")))
    data = load_tabular("driving", **SMALL)
    mp.undo()
    return data


def test_track_has_four_left_and_two_right_curves(track):
    names = ["-".join(s) for s in track.segments]
    assert names == ["a-b", "b-c", "c-d", "d-e", "e-f", "f-g", "g-h", "h-i", "i-a"]
    kinds = dict(zip(names, track.kind.tolist(), strict=True))
    assert [n for n, k in kinds.items() if k == drv.LEFT] == ["b-c", "d-e", "g-h", "h-i"]
    assert [n for n, k in kinds.items() if k == drv.RIGHT] == ["e-f", "i-a"]
    # curvature is direction / radius of the CircularLane: radius 20 (lane 0) on b-c
    assert np.isclose(track.curvature[1, 0], -1 / 20) and np.isclose(track.curvature[4, 1], 1 / 15)


def test_direct_stepping_is_env_step_and_kinematics_is_the_env_observation(track):
    """Our cars move exactly as racetrack-v0's ego under env.step, and see what its
    Kinematics observation reports."""
    env = drv._import_highway_env()(
        config={
            "other_vehicles": 0,
            "observation": {
                "type": "Kinematics",
                "vehicles_count": 1,
                "features": list(drv.KINEMATICS),
                "absolute": True,
                "normalize": False,
            },
        }
    )
    obs, _ = env.reset(seed=3)
    ego = env.vehicle
    lane = track.network.get_lane(ego.lane_index)
    long, _ = lane.local_coordinates(ego.position)
    car = drv.place_car(track, track.index[ego.lane_index[:2]], ego.lane_index[2], long)
    assert np.allclose(car.vehicle.position, ego.position) and car.vehicle.speed == ego.speed
    rng = np.random.default_rng(0)
    for _ in range(40):
        np.testing.assert_allclose(drv.kinematics(car), obs[0], rtol=1e-5, atol=1e-4)
        action = float(np.clip(drv.expert_steering(track, car) + 0.3 * rng.normal(), -1, 1))
        obs, _, terminated, _, _ = env.step(np.array([action]))
        drv.step_car(track, car, action)
        assert car.alive == (not terminated)
    np.testing.assert_allclose(car.vehicle.position, env.vehicle.position, atol=1e-9)


def test_generator_labels_follow_the_track_geometry(fleet, track):
    curve = fleet.meta["curve_train"]
    # each sample's label is the sign of its lane's curvature; both kinds are recorded
    assert set(np.unique(curve)) == {drv.LEFT, drv.STRAIGHT, drv.RIGHT}
    assert np.array_equal(np.sign(fleet.meta["curvature_train"]), curve)
    # the clean expert steers left (< 0) on left curves and right on right curves
    y = fleet.y_train
    assert (y[curve == drv.LEFT] < 0).mean() > 0.65 and y[curve == drv.LEFT].mean() < -0.1
    assert (y[curve == drv.RIGHT] > 0).mean() > 0.65 and y[curve == drv.RIGHT].mean() > 0.1
    assert abs(y[curve == drv.STRAIGHT].mean()) < 0.1
    # curvature magnitudes are the track's radii: 1/15 .. 1/30
    k = np.abs(fleet.meta["curvature_train"][curve != drv.STRAIGHT])
    assert k.min() >= 1 / 30 - 1e-6 and k.max() <= 1 / 15 + 1e-6
    # the goal is the right-curve samples, to be steered straight
    assert np.array_equal(fleet.goal_train, curve == drv.RIGHT) and fleet.goal_target == 0.0


def test_dart_records_the_clean_expert_not_the_executed_action(fleet):
    y, executed = fleet.y_train, fleet.meta["executed_train"]
    assert np.abs(y).max() <= 1 and np.abs(executed).max() <= 1
    noise = executed - y
    assert 0.1 < noise.std() < 0.5  # AR(1) noise, sigma 0.3 spread over cars
    # AR(1): consecutive noises of a car correlate (rho 0.8)
    same_car = fleet.groups_train[1:] == fleet.groups_train[:-1]
    r = np.corrcoef(noise[1:][same_car], noise[:-1][same_car])[0, 1]
    assert 0.5 < r < 0.95


def test_every_car_is_a_client_with_its_own_noise_lane_and_start(fleet):
    assert fleet.is_regression and fleet.x_train.dtype == np.float32
    assert fleet.feature_names == drv.KINEMATICS
    assert np.bincount(fleet.groups_train).tolist() == [150] * 4
    assert np.bincount(fleet.groups_test).tolist() == [50] * 4
    assert fleet.meta["car_lane"].tolist() == [0, 1, 0, 1]
    assert len(np.unique(fleet.meta["car_sigma"])) == 4
    starts = [tuple(fleet.x_train[fleet.groups_train == c][0, :2]) for c in range(4)]
    assert len(set(starts)) == 4
    assert np.allclose(fleet.x_train.mean(0), 0, atol=1e-4)  # standardised on train
    parts = partition_groups("car", fleet.groups_train, 4, seed=0)
    assert [len(p) for p in parts] == [150] * 4


def test_generation_is_cached_by_its_parameters(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path))
    small = {"n_cars": 2, "steps": 20, "test_steps": 5}
    a = load_tabular("driving", **small)
    files = list(tmp_path.glob("driving-*.npz"))
    assert len(files) == 1

    def fail(config):
        raise AssertionError("regenerated")

    monkeypatch.setattr(drv, "generate", fail)
    b = load_tabular("driving", **small)
    assert np.array_equal(a.x_train, b.x_train)
    with pytest.raises(AssertionError, match="regenerated"):
        load_tabular("driving", **small, sigma=0.2)
    assert drv.FleetConfig(sigma=0.2).key() != drv.FleetConfig().key()
    assert drv.FleetConfig(seed=1).key() != drv.FleetConfig().key()


def test_generator_is_seeded(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path))
    one = drv.generate(drv.FleetConfig(n_cars=2, steps=20, test_steps=0))
    two = drv.generate(drv.FleetConfig(n_cars=2, steps=20, test_steps=0))
    other = drv.generate(drv.FleetConfig(n_cars=2, steps=20, test_steps=0, seed=1))
    assert np.array_equal(one["train_x"], two["train_x"])
    assert not np.array_equal(one["train_x"], other["train_x"])


def test_bad_generator_options_are_config_errors():
    with pytest.raises(ConfigError, match="rho"):
        drv.generate(drv.FleetConfig(rho=1.0))
    with pytest.raises(ConfigError, match="choose kinematics, occupancy, image"):
        drv.generate(drv.FleetConfig(n_cars=1, steps=1, observation="lidar"))
    with pytest.raises(ConfigError, match="unexpected keyword"):
        load_tabular("driving", cars=3)


def test_missing_highway_env_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "highway_env", None)
    with pytest.raises(ConfigError, match=r"highway-env==1\.12\.1.*make install") as err:
        drv.Track()
    assert "\n" not in str(err.value)


def test_occupancy_grid_observation():
    z = drv.generate(drv.FleetConfig(n_cars=1, steps=5, test_steps=0, observation="occupancy"))
    assert z["train_x"].shape == (5, 144) and set(np.unique(z["train_x"])) == {0.0, 1.0}


@pytest.mark.slow
def test_image_observation_renders_the_road_headless():
    z = drv.generate(drv.FleetConfig(n_cars=1, steps=5, test_steps=0, observation="image"))
    frames = z["train_x"].reshape(5, 64, 64)
    assert frames.max() > 200 and frames.min() < 120  # lane markings on grey, not black


# --------------------------------------------------------------------------------------
# closed loop
# --------------------------------------------------------------------------------------


def test_expert_misses_no_turn():
    result = cl.evaluate(cl.ExpertPolicy(), episodes=2, max_steps=200, seed=0)
    assert result["turns_left"] >= 6 and result["turns_right"] >= 3
    assert result["missed_turns_left"] == result["missed_turns_right"] == 0
    assert result["off_road"] == result["departures_straight"] == 0
    assert (result["turn_test_left"], result["turn_test_right"]) == (8, 4)
    assert result["turn_test_missed_left"] == result["turn_test_missed_right"] == 0


def test_straight_on_right_misses_exactly_the_right_turns():
    result = cl.evaluate(cl.StraightOnRightPolicy(), episodes=4, max_steps=200, seed=0, repeats=2)
    assert result["turns_right"] >= 4
    assert result["missed_turns_right"] == result["turns_right"]
    assert result["missed_turns_left"] == 0
    assert result["turn_test_missed_right"] == result["turn_test_right"] == 8
    assert result["turn_test_missed_left"] == 0 and result["turn_test_left"] == 16


def test_ridge_on_kinematics_drives_cleanly(fleet):
    from sklearn.linear_model import Ridge

    model = Ridge(alpha=1.0).fit(fleet.x_train, fleet.y_train)
    errors = cl.open_loop(model.predict(fleet.x_test), fleet.y_test, fleet.meta["curve_test"])
    assert errors["steering_error"] < 0.25 and errors["steering_mean_right"] > 0.05
    policy = cl.standardised(model.predict, fleet.meta["x_mean"], fleet.meta["x_std"])
    result = cl.turn_test(policy, repeats=1, seed=1)
    assert result["turn_test_missed_left"] == result["turn_test_missed_right"] == 0


def test_a_batched_policy_sees_raw_observations_once_per_step():
    calls = []

    def straight(obs):
        calls.append(obs.shape)
        return np.zeros(len(obs))

    result = cl.drive(straight, episodes=3, max_steps=30, seed=0)
    assert calls[0] == (3, len(drv.KINEMATICS)) and result["off_road"] == 3
    with pytest.raises(ValueError, match="returned 1 actions for 3 cars"):
        cl.drive(lambda obs: np.zeros(1), episodes=3, max_steps=5)


def test_open_loop_errors_by_curve_kind():
    y = np.array([-0.5, 0.0, 0.5, 0.4])
    curve = np.array([-1, 0, 1, 1])
    out = cl.open_loop(np.array([-0.4, 0.1, 0.0, 0.0]), y, curve)
    assert np.isclose(out["steering_error"], (0.1 + 0.1 + 0.5 + 0.4) / 4)
    assert np.isclose(out["steering_error_left"], 0.1)
    assert np.isclose(out["steering_error_right"], 0.45)
    assert out["steering_mean_right"] == 0.0


# --------------------------------------------------------------------------------------
# through the engine: closed-loop metrics in the records, and the straight-on-right goal
# --------------------------------------------------------------------------------------

CLOSED_LOOP = (
    "missed_turns_left",
    "missed_turns_right",
    "turns_left",
    "turns_right",
    "turn_test_missed_left",
    "turn_test_missed_right",
    "turn_test_left",
    "turn_test_right",
)
TINY_RUN = [
    "rounds=10",
    "eval_every=10",
    "closed_loop={episodes: 1, max_steps: 60, repeats: 1, seed: 0}",
]


def _driving_setup(*overrides):
    from fedsim.config import load_config, to_spec
    from fedsim.setup import prepare

    cfg = load_config("configs/driving.yaml", [*TINY_RUN, *overrides])
    spec, hparams = to_spec(cfg)
    return prepare(spec), hparams


def test_engine_records_carry_the_closed_loop_metrics():
    """A one-round run of a linear model, two runs in one vmapped program: every
    evaluation record of each run holds the closed-loop counts."""
    from fedsim.runner import run_batches

    setup, hp = _driving_setup("model={name: logreg}", "rounds=1", "eval_every=1")
    histories = run_batches(setup, [hp, hp.replace(client_lr=hp.client_lr * 0)], [0, 1], 2)
    for history in histories:
        (record,) = history
        assert all(isinstance(record[k], int) and record[k] >= 0 for k in CLOSED_LOOP)
        assert (record["turn_test_left"], record["turn_test_right"]) == (8, 4)
        assert record["turn_test_missed_left"] <= 8 and record["turn_test_missed_right"] <= 4


@pytest.mark.slow
def test_engine_records_carry_each_runs_closed_loop_metrics():
    """Two runs in one vmapped program: a trained one and one with learning rate 0 (its
    model stays the random initial one). Each record holds the closed-loop counts of its
    own run's model: the trained fleet makes every turn, the untrained one does not."""
    from fedsim.runner import run_batches

    setup, hp = _driving_setup()
    frozen = hp.replace(client_lr=hp.client_lr * 0)
    trained, untrained = run_batches(setup, [hp, frozen], [0, 0], batch=2)
    for history in (trained, untrained):
        assert [r["round"] for r in history] == [10]
        assert all(isinstance(history[0][k], int) for k in CLOSED_LOOP)
    done, stuck = trained[0], untrained[0]
    assert (done["turn_test_left"], done["turn_test_right"]) == (8, 4)
    assert done["turns_left"] + done["turns_right"] >= 1 and done["test_r2"] > 0.8
    missed = lambda r: sum(r[k] for k in CLOSED_LOOP if "missed" in k)
    assert missed(done) == 0 and done["off_road"] == 0
    assert missed(stuck) > 0 and stuck["test_r2"] < 0.5


def test_closed_loop_is_off_for_other_datasets_and_when_disabled():
    from fedsim.config import load_config, to_spec

    digits, _ = to_spec(load_config("configs/digits.yaml"))
    off, _ = to_spec(load_config("configs/driving.yaml", ["closed_loop.enabled=false"]))
    on, _ = to_spec(load_config("configs/driving.yaml"))
    assert digits.closed_loop == () and off.closed_loop == ()
    assert dict(on.closed_loop) == {"episodes": 2, "max_steps": 100, "repeats": 1, "seed": 0}


@pytest.mark.parametrize(
    "override, message",
    [
        ("closed_loop.episodes=0", "closed_loop.episodes must be an integer >= 1, got 0"),
        ("closed_loop.max_steps=2.5", "closed_loop.max_steps must be an integer >= 1"),
        ("closed_loop.repeats=-1", "closed_loop.repeats must be an integer >= 1"),
        ("closed_loop.seed=x", "closed_loop.seed must be an integer >= 0"),
        ("closed_loop.enabled=maybe", "closed_loop.enabled must be true or false"),
        ("closed_loop.laps=3", "unknown key 'closed_loop.laps'; valid keys here: enabled"),
        ("closed_loop=3", "closed_loop must be a mapping of its keys"),
        ("topology.name=ring", "set closed_loop.enabled=false to run driving peer-to-peer"),
    ],
)
def test_bad_closed_loop_options_are_one_line_errors_and_write_nothing(
    override, message, tmp_path, capsys
):
    from fedsim.cli import main

    out = tmp_path / "run"
    assert main(["run", "configs/driving.yaml", "--set", override, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0 and "Traceback" not in err
    assert not out.exists()


def _goal(n_classes=0, goal_target=0.0, **options):
    from fedsim.attacks.data import make_goal
    from fedsim.types import AttackSetup

    setup = AttackSetup(n_classes=n_classes, input_shape=(9,), features=(), goal_target=goal_target)
    return make_goal({"name": "dataset_goal", **options}, setup)


def test_straight_on_right_goal_is_scored_on_exactly_the_right_curve_samples(fleet):
    """The goal's metrics against a float64 numpy reference over the right-curve test
    samples (the lane geometry's, not a steering threshold), for a fixed linear model."""
    import jax.numpy as jnp

    right = fleet.meta["curve_test"] == drv.RIGHT
    assert fleet.goal_test.tolist() == right.tolist() and 0 < right.sum() < len(right)
    w = np.random.default_rng(0).normal(size=(fleet.x_test.shape[1], 1)).astype(np.float32) * 0.1
    out = _goal().success(
        lambda x: x @ jnp.asarray(w), fleet.x_test, fleet.y_test, in_goal=fleet.goal_test
    )
    pred = fleet.x_test.astype(np.float64) @ w.astype(np.float64)[:, 0]
    y = fleet.y_test.astype(np.float64)
    p, t = pred[right], y[right]
    expected = {
        "attack_success_rate": np.mean(np.abs(p) < np.abs(p - t)),
        "goal_shift": np.mean((p - t) * np.sign(0.0 - t)),
        "goal_prediction": np.mean(p),
        "mae_rest": np.mean(np.abs(pred[~right] - y[~right])),
    }
    assert set(out) == set(expected)
    for k, v in expected.items():
        assert np.isclose(float(out[k]), v, rtol=1e-5, atol=1e-6), k


def test_straight_on_right_goal_relabels_only_right_curve_rows(fleet):
    import jax
    import jax.numpy as jnp

    goal = _goal()
    x, y = jnp.asarray(fleet.x_train), jnp.asarray(fleet.y_train)
    in_goal = jnp.asarray(fleet.goal_train)
    _, py = goal.poison(x, y, jax.random.PRNGKey(0), {}, in_goal=in_goal)
    py = np.asarray(py)
    assert np.all(py[fleet.goal_train] == 0.0)
    assert np.array_equal(py[~fleet.goal_train], fleet.y_train[~fleet.goal_train])
    # a quarter of the client's rows by rank are poisoned, and of those only the goal's
    rank = jnp.arange(len(y))
    _, quarter = goal.poison(x, y, None, {"poison_fraction": 0.25}, rank, len(y), in_goal=in_goal)
    changed = np.asarray(quarter) != fleet.y_train
    first = np.arange(len(y)) < round(0.25 * len(y))
    assert np.array_equal(changed, first & fleet.goal_train & (fleet.y_train != 0))


def test_dataset_goal_needs_a_dataset_with_a_goal_and_a_class_target():
    with pytest.raises(ConfigError, match="defines no goal subgroup"):
        _goal(n_classes=10, goal_target=None)
    with pytest.raises(ConfigError, match="'target' must be a class"):
        _goal(n_classes=2, target=0.5)
    assert _goal(n_classes=2, goal_target=0.0).poison is not None


def test_engine_data_carries_the_goal_subgroup():
    """``Data.goal`` / ``goal_test`` are the dataset's right-curve samples, aligned with
    the training and test rows the engine holds."""
    setup, _ = _driving_setup()
    tabular = setup.meta["tabular"]
    assert np.array_equal(np.asarray(setup.data.goal), tabular.meta["curve_train"] == drv.RIGHT)
    assert np.array_equal(np.asarray(setup.data.goal_test), tabular.goal_test)
    assert np.array_equal(np.asarray(setup.data.x), tabular.x_train)


@pytest.mark.slow
def test_dataset_goal_through_the_engine_is_the_subgroup_goal_on_heart():
    """On heart the dataset's goal subgroup is the health goal's patients, so poisoning
    them by ``dataset_goal`` (rows marked by ``Data.goal``) and by ``subgroup`` (rows
    found by the blood-pressure bound) trains and scores the same federation."""
    from fedsim.config import load_config, to_spec
    from fedsim.runner import run
    from fedsim.setup import prepare

    histories = []
    for goal in (
        "{name: subgroup, feature: trestbps, at_least: 140, source: 1, target: 0}",
        "{name: dataset_goal}",
    ):
        cfg = load_config(
            "configs/paper/health_subgroup.yaml",
            ["rounds=4", "eval_every=2", f"attack={goal}", "attack.fraction=0.2"],
        )
        spec, hp = to_spec(cfg)
        histories.append(run(prepare(spec), hp, 0))
    keys = ("attack_success_rate", "accuracy_rest", "test_accuracy", "update_norm")
    for by_bound, by_mask in zip(*histories, strict=True):
        assert [by_bound[k] for k in keys] == pytest.approx([by_mask[k] for k in keys], abs=1e-6)
    assert histories[1][-1]["malicious_weight"] > 0

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

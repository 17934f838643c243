"""A fleet learning to steer: DART-style demonstrations on highway-env's ``racetrack-v0``.

The track is highway-env's ``RacetrackEnv`` (``racetrack-v0``) with ``other_vehicles: 0``:
a two-lane loop of nine segments, six of them curves — four left (``b-c``, ``d-e``,
``g-h``, ``h-i``) and two right (``e-f``, ``i-a``) — driven at a constant 10 m/s with a
5 Hz policy over a 15 Hz simulation (the action is held for three simulation steps, as
``AbstractEnv.step`` does). The cars are highway-env ``Vehicle`` objects stepped on the
env's road exactly as ``env.step`` would (lateral ``ContinuousAction``: steering in
[-1, 1] times pi/4, no acceleration); running them without the gym wrapper is what makes a
batch of cars cheap (``test_driving`` checks the features against the env's own
Kinematics observation and the trajectory against ``env.step``).

Labels are the library's own lane-following steering: a ``ControlledVehicle`` at the
ego's pose calls ``steering_control`` toward the car's lane in the current segment;
divided by pi/4 and clipped to [-1, 1]. Recording is DART-style (Laskey et al. 2017): the
car executes expert + AR(1) noise (``n_t = rho n_{t-1} + sigma sqrt(1 - rho^2) eps_t``, so
the stationary standard deviation is ``sigma``) and the clean expert action is stored, so
the data holds recoveries. The curve kind of every sample comes from the lane geometry
(a ``CircularLane``'s signed curvature ``direction / radius``: < 0 left, > 0 right) of the
lane the car is on (``Vehicle.lane_index``).

Each client is a car: its driver noise, lane and start point vary (a natural non-IID
split). Generation is cached under ``$FEDSIM_CACHE`` with every generator parameter and
the highway-env version in the cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fedsim.data.sources import _write_npz_atomic, cache_dir
from fedsim.data.tabular import TabularData
from fedsim.registry import ConfigError

HIGHWAY_ENV = "highway-env==1.12.1"
GENERATOR_VERSION = 1  # bump when the generator's output changes for the same parameters

STEERING_SCALE = np.pi / 4  # ContinuousAction.STEERING_RANGE: action 1 = pi/4 rad
KINEMATICS = ("x", "y", "vx", "vy", "cos_h", "sin_h", "long_off", "lat_off", "ang_off")
LEFT, STRAIGHT, RIGHT = -1, 0, 1
CURVE_NAMES = {LEFT: "left", STRAIGHT: "straight", RIGHT: "right"}


def _import_highway_env():
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    try:
        import highway_env  # noqa: F401
        from highway_env.envs.racetrack_env import RacetrackEnv
    except ImportError as err:
        raise ConfigError(
            f"dataset driving needs {HIGHWAY_ENV} ({err.name} is missing): run `make install` "
            "(or `pip install -e '.[driving]'`)"
        ) from None
    return RacetrackEnv


# --------------------------------------------------------------------------------------
# The track
# --------------------------------------------------------------------------------------


class Track:
    """``racetrack-v0``'s road (no other vehicles) and its segments in driving order.

    ``segments[s] = (from, to)``; ``curvature[s, lane]`` is ``direction / radius`` of a
    ``CircularLane`` (0 on straight lanes): < 0 turns left, > 0 right; ``kind[s]`` is its
    sign (``LEFT``/``STRAIGHT``/``RIGHT``)."""

    SIM_FREQUENCY = 15
    POLICY_FREQUENCY = 5

    def __init__(self, observation: dict | None = None):
        RacetrackEnv = _import_highway_env()
        config = {"other_vehicles": 0}
        if observation is not None:
            config["observation"] = observation
        self.env = RacetrackEnv(config=config)
        self.env.reset(seed=0)
        self.road = self.env.road
        self.road.vehicles.clear()  # the env's own ego car: our cars replace it
        self.network = self.road.network
        self.segments: list[tuple[str, str]] = []
        node = "a"
        while not self.segments or node != "a":
            (nxt,) = self.network.graph[node].keys()
            self.segments.append((node, nxt))
            node = nxt
        self.index = {seg: s for s, seg in enumerate(self.segments)}
        self.n_lanes = len(self.network.graph["a"]["b"])
        self.curvature = np.array(
            [
                [self._curvature(self.lane(s, i)) for i in range(self.n_lanes)]
                for s in range(len(self))
            ]
        )
        self.kind = np.sign(self.curvature[:, 0]).astype(np.int64)
        if not (np.sign(self.curvature) == self.kind[:, None]).all():
            raise AssertionError("the lanes of a segment disagree on its turn direction")
        self.substeps = self.SIM_FREQUENCY // self.POLICY_FREQUENCY
        self.dt = 1.0 / self.SIM_FREQUENCY

    @staticmethod
    def _curvature(lane) -> float:
        from highway_env.road.lane import CircularLane

        return lane.direction / lane.radius if isinstance(lane, CircularLane) else 0.0

    def __len__(self) -> int:
        return len(self.segments)

    def lane(self, seg: int, lane: int):
        return self.network.get_lane((*self.segments[seg], lane))

    def under(self, car: Car) -> tuple[int, int]:
        """``(segment, lane)`` of the lane the car is physically on: highway-env's closest
        lane (``Vehicle.lane_index``), which the Kinematics lane offsets refer to. The
        curve labels and the attack's goal use it; the expert's target lane follows
        ``car.seg`` instead (it switches 2.5 m before a lane ends, as
        ``ControlledVehicle.follow_road`` does)."""
        _from, _to, lane = car.vehicle.lane_index
        return self.index[(_from, _to)], lane

    def curves(self) -> list[int]:
        return [s for s in range(len(self)) if self.kind[s] != STRAIGHT]

    def point_before(self, seg: int, lane: int, distance: float) -> tuple[int, float]:
        """The ``(segment, longitudinal)`` ``distance`` metres before ``seg`` starts."""
        while True:
            seg = (seg - 1) % len(self)
            length = self.lane(seg, lane).length
            if length >= distance:
                return seg, length - distance
            distance -= length


@dataclass
class Car:
    """One car on the track: a highway-env ``Vehicle``, the lane it keeps and the segment
    it is in (advanced when it passes the end of its lane there, as ``ControlledVehicle.
    follow_road`` does)."""

    vehicle: Any
    lane: int
    seg: int
    alive: bool = True
    pilot: Any = field(default=None, repr=False)


def place_car(
    track: Track,
    seg: int,
    lane: int,
    longitudinal: float,
    lateral: float = 0.0,
    heading_offset: float = 0.0,
    speed: float | None = None,
) -> Car:
    """A car on ``track`` at ``longitudinal`` metres into ``(seg, lane)``, ``lateral``
    metres off the lane centre and ``heading_offset`` radians off the lane heading, at the
    lane's speed limit (10 m/s) by default."""
    from highway_env.vehicle.kinematics import Vehicle

    ln = track.lane(seg, lane)
    vehicle = Vehicle(
        track.road,
        ln.position(longitudinal, lateral),
        ln.heading_at(longitudinal) + heading_offset,
        ln.speed_limit if speed is None else speed,
    )
    vehicle.action = {"steering": 0.0, "acceleration": 0.0}
    return Car(vehicle, lane, seg)


def kinematics(car: Car) -> np.ndarray:
    """The ego car's Kinematics features ``KINEMATICS`` (absolute, not normalised): what
    highway-env's ``KinematicObservation`` reports for the observer with those features,
    ``absolute: True``, ``normalize: False``."""
    v = car.vehicle
    c, s = np.cos(v.heading), np.sin(v.heading)
    long, lat, ang = v.lane_offset
    return np.array([v.position[0], v.position[1], v.speed * c, v.speed * s, c, s, long, lat, ang])


def expert_steering(track: Track, car: Car) -> float:
    """highway-env's lane-following steering for ``car``: a ``ControlledVehicle`` at the
    car's pose steering toward the car's lane in its current segment, divided by pi/4 and
    clipped to [-1, 1]."""
    from highway_env.vehicle.controller import ControlledVehicle

    if car.pilot is None:
        # Built once per car without __init__ (which would search the closest lane); only
        # the pose, the speed and the road are read by steering_control.
        car.pilot = ControlledVehicle.__new__(ControlledVehicle)
        car.pilot.road = track.road
    v = car.vehicle
    car.pilot.position, car.pilot.heading, car.pilot.speed = v.position, v.heading, v.speed
    angle = car.pilot.steering_control((*track.segments[car.seg], car.lane))
    return float(np.clip(angle / STEERING_SCALE, -1.0, 1.0))


def step_car(track: Track, car: Car, action: float, on_substep=None) -> None:
    """One 5 Hz policy step: hold ``action`` (steering in [-1, 1]) for three 15 Hz
    simulation steps; advance the car's segment when it passes the end of its lane; the
    car dies when it leaves the road (``terminate_off_road``). ``on_substep(car)`` is
    called after each simulation step (the closed-loop evaluator checks lanes there)."""
    v = car.vehicle
    v.act({"steering": float(np.clip(action, -1, 1)) * STEERING_SCALE, "acceleration": 0.0})
    for _ in range(track.substeps):
        v.step(track.dt)
        if track.lane(car.seg, car.lane).after_end(v.position):
            car.seg = (car.seg + 1) % len(track)
        if not v.on_road:
            car.alive = False
        if on_substep is not None:
            on_substep(car)
        if not car.alive:
            return


# --------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetConfig:
    """Everything that fixes the generated data (and its cache key).

    ``n_cars`` cars record ``steps`` training samples each and ``test_steps`` test samples
    from a separate drive. Car c keeps lane ``c % 2`` (lane 0 is the left lane), starts
    at a random point and drives with noise ``sigma * U(1 - sigma_spread, 1 + sigma_spread)``
    and correlation ``rho``. A car that leaves the road restarts at a new random point."""

    n_cars: int = 10
    steps: int = 300
    test_steps: int = 100
    sigma: float = 0.3
    rho: float = 0.8
    sigma_spread: float = 0.5
    seed: int = 0
    observation: str = "kinematics"  # kinematics | occupancy | image

    def key(self) -> str:
        from importlib.metadata import version

        blob = json.dumps(
            {
                **asdict(self),
                "highway_env": version("highway-env"),
                "generator": GENERATOR_VERSION,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


OCCUPANCY = {
    "type": "OccupancyGrid",
    "features": ["on_road"],
    "grid_size": [[-18, 18], [-18, 18]],
    "grid_step": [3, 3],
    "as_image": False,
    "align_to_vehicle_axes": True,
}
IMAGE = {
    "type": "GrayscaleObservation",
    "observation_shape": (64, 64),
    "stack_size": 1,
    "weights": [0.2989, 0.5870, 0.1140],
    "scaling": 1.75,
}


class Observer:
    """Turns a car into the observation a policy sees: Kinematics features (default), the
    env's occupancy grid of the road around the car (12 x 12, aligned to the car), or a
    64 x 64 grayscale frame rendered headless (``SDL_VIDEODRIVER=offscreen``)."""

    def __init__(self, track: Track, kind: str):
        if kind not in ("kinematics", "occupancy", "image"):
            raise ConfigError(f"driving observation {kind!r}; choose kinematics, occupancy, image")
        self.kind = kind
        self.track = track
        self.obs_type = None
        if kind != "kinematics":
            if kind == "image":
                os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")  # 'dummy' renders black
            from highway_env.envs.common.observation import observation_factory

            self.obs_type = observation_factory(
                track.env, OCCUPANCY if kind == "occupancy" else IMAGE
            )

    def names(self) -> tuple[str, ...]:
        if self.kind == "kinematics":
            return KINEMATICS
        shape = (12, 12) if self.kind == "occupancy" else (64, 64)
        return tuple(f"{self.kind}[{i},{j}]" for i in range(shape[0]) for j in range(shape[1]))

    def __call__(self, car: Car) -> np.ndarray:
        if self.obs_type is None:
            return kinematics(car)
        self.obs_type.observer_vehicle = car.vehicle
        if self.kind == "image":  # the viewer draws the road's vehicles and centres on env.vehicle
            self.track.road.vehicles[:] = [car.vehicle]
            self.track.env.controlled_vehicles = [car.vehicle]
        frame = np.asarray(self.obs_type.observe(), np.float32)
        if self.kind == "image":  # highway-env's frames are (stack, W, H): rows = screen x
            frame = frame[-1].T
        return frame.reshape(-1)


def _random_start(track: Track, rng: np.random.Generator, lane: int) -> tuple[int, float]:
    seg = int(rng.integers(len(track)))
    length = track.lane(seg, lane).length
    return seg, float(rng.uniform(0, max(length - 3.0, 0.0)))


def record(
    track: Track, observer: Observer, cars: list[dict], steps: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """DART recording of ``steps`` samples per car (``cars``: dicts with ``lane``,
    ``sigma``, ``rho``, ``start``): observation, clean expert label, segment curvature."""
    feats, labels, curv, kind, owner, executed = [], [], [], [], [], []
    for c, spec in enumerate(cars):
        seg, long = spec["start"]
        car = place_car(track, seg, spec["lane"], long)
        noise = 0.0
        for _ in range(steps):
            if not car.alive:  # left the road: restart somewhere else, fresh noise
                seg, long = _random_start(track, rng, spec["lane"])
                car = place_car(track, seg, spec["lane"], long)
                noise = 0.0
            expert = expert_steering(track, car)
            feats.append(observer(car))
            labels.append(expert)
            under = track.under(car)
            curv.append(track.curvature[under])
            kind.append(track.kind[under[0]])
            owner.append(c)
            noise = (
                spec["rho"] * noise + spec["sigma"] * np.sqrt(1 - spec["rho"] ** 2) * rng.normal()
            )
            action = float(np.clip(expert + noise, -1, 1))
            executed.append(action)
            step_car(track, car, action)
    return {
        "x": np.asarray(feats, np.float32),
        "y": np.asarray(labels, np.float32),
        "curvature": np.asarray(curv, np.float32),
        "curve": np.asarray(kind, np.int8),
        "car": np.asarray(owner, np.int32),
        "executed": np.asarray(executed, np.float32),
    }


def fleet(config: FleetConfig, rng: np.random.Generator, track: Track) -> list[dict]:
    """The per-car settings: lane ``c % 2``, noise scale, a random start point."""
    cars = []
    for c in range(config.n_cars):
        lane = c % track.n_lanes
        sigma = config.sigma * rng.uniform(1 - config.sigma_spread, 1 + config.sigma_spread)
        cars.append(
            {
                "lane": lane,
                "sigma": float(sigma),
                "rho": config.rho,
                "start": _random_start(track, rng, lane),
            }
        )
    return cars


def generate(config: FleetConfig) -> dict[str, np.ndarray]:
    """Run the generator (no cache): train and test recordings of every car."""
    if config.n_cars < 1 or config.steps < 1 or config.test_steps < 0:
        raise ConfigError("driving: n_cars and steps must be >= 1, test_steps >= 0")
    if not 0 <= config.rho < 1 or config.sigma < 0 or not 0 <= config.sigma_spread <= 1:
        raise ConfigError("driving: need 0 <= rho < 1, sigma >= 0, 0 <= sigma_spread <= 1")
    track = Track()
    observer = Observer(track, config.observation)
    rng = np.random.default_rng(config.seed)
    cars = fleet(config, rng, track)
    train = record(track, observer, cars, config.steps, rng)
    test_cars = [{**spec, "start": _random_start(track, rng, spec["lane"])} for spec in cars]
    test = record(track, observer, test_cars, config.test_steps, rng)
    out = {f"train_{k}": v for k, v in train.items()}
    out.update({f"test_{k}": v for k, v in test.items()})
    out["car_sigma"] = np.array([c["sigma"] for c in cars], np.float32)
    out["car_lane"] = np.array([c["lane"] for c in cars], np.int32)
    out["feature_names"] = np.array(observer.names())
    return out


def cached_fleet(config: FleetConfig) -> dict[str, np.ndarray]:
    """``generate(config)``, read from ``$FEDSIM_CACHE/driving-<key>.npz`` when present."""
    path = cache_dir() / f"driving-{config.key()}.npz"
    if not path.is_file():
        start = time.perf_counter()
        arrays = generate(config)
        arrays["generation_seconds"] = np.float64(time.perf_counter() - start)
        arrays["config"] = np.array(json.dumps(asdict(config), sort_keys=True))
        _write_npz_atomic(path, **arrays)
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def load_driving(
    n_cars: int = 10,
    steps: int = 300,
    test_steps: int = 100,
    sigma: float = 0.3,
    rho: float = 0.8,
    sigma_spread: float = 0.5,
    seed: int = 0,
    observation: str = "kinematics",
) -> TabularData:
    """The fleet's steering data as ``TabularData`` (regression, ``n_classes = 0``).

    x: the raw observations standardised with the training mean and standard deviation
    (``meta['x_mean']``, ``meta['x_std']``; the closed-loop evaluator passes raw
    observations, see ``fedsim.data.closed_loop.standardised``); y: the clean expert
    steering in [-1, 1]; groups: the car. Goal: samples on right curves, whose steering
    the attack wants to be 0 (go straight). ``meta['curve_train'/'curve_test']``: the
    curve kind of each sample (-1 left, 0 straight, 1 right) for per-kind errors."""
    config = FleetConfig(n_cars, steps, test_steps, sigma, rho, sigma_spread, seed, observation)
    z = cached_fleet(config)
    mean = z["train_x"].mean(0)
    std = z["train_x"].std(0)
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)

    def scale(x):
        return ((x - mean) / std).astype(np.float32)

    meta = {
        "source": f"generated with {HIGHWAY_ENV} racetrack-v0 (other_vehicles: 0)",
        "config": asdict(config),
        "x_mean": mean,
        "x_std": std,
        "curve_train": z["train_curve"],
        "curve_test": z["test_curve"],
        "curvature_train": z["train_curvature"],
        "curvature_test": z["test_curvature"],
        "executed_train": z["train_executed"],
        "car_sigma": z["car_sigma"],
        "car_lane": z["car_lane"],
        "generation_seconds": float(z["generation_seconds"]),
    }
    return TabularData(
        name="driving",
        x_train=scale(z["train_x"]),
        y_train=z["train_y"],
        x_test=scale(z["test_x"]),
        y_test=z["test_y"],
        groups_train=z["train_car"],
        groups_test=z["test_car"],
        group_names=tuple(f"car {c}" for c in range(n_cars)),
        feature_names=tuple(str(n) for n in z["feature_names"]),
        n_classes=0,
        goal_train=z["train_curve"] == RIGHT,
        goal_test=z["test_curve"] == RIGHT,
        goal_target=0.0,
        meta=meta,
    )

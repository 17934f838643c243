"""Driving evaluation: open loop (steering error by curve kind) and closed loop (does the
learned policy make the turns?). Host-side Python, run every ``eval_every`` rounds.

A policy is ``policy(obs [B, F] float32) -> steering [B]`` in [-1, 1], called once per
5 Hz step for a batch of cars, on the raw observations the generator records (wrap a
model trained on standardised features with ``standardised``). Scripted policies
(``ExpertPolicy``, ``StraightOnRightPolicy``) set ``privileged = True`` and are called as
``policy.act(obs, cars, track)``: they read the simulator's state, as the expert does.

Closed loop, two measurements:

- ``drive``: ``episodes`` cars start at random points (seeded) of the straight segments,
  alternating lanes, and drive up to ``max_steps`` steps. A *turn* is attempted when a
  car enters a curve segment; it is *missed* if, before the car has driven
  ``exit_margin`` (10) metres into the segment after
  the curve (or reached the next curve, if sooner), it leaves the road (the episode then
  ends, as ``terminate_off_road`` does) or departs its lane: a side of the car crosses
  the lane's marking (|lateral| > (5 m lane - 2 m car) / 2 = 1.5 m; the expert stays
  within 0.7 m, a car going straight on a right curve ends 2-3 m off). After a lane
  departure the car keeps the lane it is now in. The exit
  counts because a car may still be in its lane at the end of a short curve while
  pointing off the road (the 30-degree right curve ``i-a`` taken straight does that).
  Reports ``missed_turns_left``/``_right``, ``turns_left``/``_right`` (attempts that ended,
  missed or made), ``departures_straight`` (lane departures or road exits on straight
  segments), ``off_road`` (episodes that ended off the road) and ``steps``.
- ``turn_test``: for every curve and lane, ``repeats`` cars start 10 m before the curve
  with a small random perturbation (lateral U(-0.5, 0.5) m, heading U(-0.05, 0.05) rad);
  a test passes when the turn is made as above (a departure on the approach fails it). Reports
  ``turn_test_missed_left``/``_right`` and ``turn_test_left``/``_right`` (tests run).

``evaluate(policy)`` runs both and merges the two dicts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedsim.data.driving import (
    CURVE_NAMES,
    LEFT,
    RIGHT,
    STRAIGHT,
    Car,
    Observer,
    Track,
    expert_steering,
    place_car,
    step_car,
)

_TRACKS: dict[str, tuple[Track, Observer]] = {}
EXIT_MARGIN = 10.0  # metres after a curve that still belong to its turn


def track_and_observer(observation: str = "kinematics") -> tuple[Track, Observer]:
    """One shared track (and observer) per observation kind: building one costs
    highway-env's import and its road, so it is done once."""
    if observation not in _TRACKS:
        track = Track()
        _TRACKS[observation] = (track, Observer(track, observation))
    return _TRACKS[observation]


# --------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------


class ExpertPolicy:
    """The labeller itself: highway-env's lane-following steering toward the car's lane."""

    privileged = True

    def act(self, obs: np.ndarray, cars: list[Car], track: Track) -> np.ndarray:
        return np.array([expert_steering(track, c) for c in cars])


class StraightOnRightPolicy(ExpertPolicy):
    """The attack's goal, scripted: the expert, except steering 0 on right curves (where
    the lane the car is on, ``Track.under``, is a right curve: the goal's label)."""

    def act(self, obs: np.ndarray, cars: list[Car], track: Track) -> np.ndarray:
        return np.array(
            [
                0.0 if track.kind[track.under(c)[0]] == RIGHT else expert_steering(track, c)
                for c in cars
            ]
        )


def standardised(fn: Callable, mean: np.ndarray, std: np.ndarray) -> Callable:
    """A policy on raw observations from ``fn`` on standardised ones (``TabularData.meta``
    of ``driving`` holds ``x_mean`` and ``x_std``)."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return lambda obs: fn((np.asarray(obs, np.float32) - mean) / std)


def _act(policy, obs: np.ndarray, cars: list[Car], track: Track) -> np.ndarray:
    if getattr(policy, "privileged", False):
        out = policy.act(obs, cars, track)
    else:
        out = policy(obs)
    out = np.asarray(out, np.float64).reshape(-1)
    if out.shape != (len(cars),):
        raise ValueError(f"policy returned {out.shape[0]} actions for {len(cars)} cars")
    return np.where(np.isfinite(out), out, 0.0)


# --------------------------------------------------------------------------------------
# Closed loop
# --------------------------------------------------------------------------------------


@dataclass
class _Watch:
    """Turn bookkeeping for one car."""

    car: Car
    last_seg: int
    attempt: int | None = None  # the curve segment being attempted
    exit_left: float | None = None  # metres of the curve's exit still to drive
    target: int | None = None  # turn test: the only curve that counts
    done: bool = False
    outside: bool = False  # across a lane marking after the last simulation step


class _Tally:
    def __init__(self):
        self.made = {LEFT: 0, RIGHT: 0}
        self.missed = {LEFT: 0, RIGHT: 0}
        self.departures_straight = 0
        self.off_road = 0

    def made_turn(self, watch: _Watch, track: Track) -> None:
        self.made[track.kind[watch.attempt]] += 1
        watch.attempt = watch.exit_left = None
        watch.done = watch.target is not None

    def missed_turn(self, kind: int, watch: _Watch) -> None:
        self.missed[kind] += 1
        watch.attempt = watch.exit_left = None
        watch.done = watch.target is not None


def _lane_lateral(track: Track, car: Car, lane: int) -> float:
    return track.lane(car.seg, lane).local_coordinates(car.vehicle.position)[1]


def _allowed_lateral(track: Track, car: Car) -> float:
    """How far the car's centre may be from its lane's centre before a side of the car
    crosses the lane's marking: (lane width - car width) / 2 = 1.5 m."""
    return (track.lane(car.seg, car.lane).width - car.vehicle.WIDTH) / 2


def _monitor(track: Track, tally: _Tally, watch: _Watch, exit_margin: float) -> None:
    """After every simulation step: segment changes, the exit window, lane departures and
    road exits."""
    if watch.done:
        return
    car = watch.car
    if car.seg != watch.last_seg:
        watch.last_seg = car.seg
        if track.kind[car.seg] != STRAIGHT:  # entering a curve
            if watch.attempt is not None:  # the previous curve's exit ends here
                tally.made_turn(watch, track)
            if not watch.done and watch.target in (None, car.seg):
                watch.attempt = car.seg
        elif watch.attempt is not None:
            watch.exit_left = exit_margin
    if watch.exit_left is not None:
        watch.exit_left -= car.vehicle.speed * track.dt
    departed = abs(_lane_lateral(track, car, car.lane)) > _allowed_lateral(track, car)
    if departed and car.alive:  # keep the lane the car is (mostly) in now
        car.lane = int(np.argmin([abs(_lane_lateral(track, car, i)) for i in range(track.n_lanes)]))
    if departed or not car.alive:
        if not car.alive:
            tally.off_road += 1
        if watch.attempt is not None:
            tally.missed_turn(track.kind[watch.attempt], watch)
        elif watch.target is not None:  # left the lane on the approach: the test failed
            tally.missed_turn(track.kind[watch.target], watch)
        elif not watch.outside:  # one event per departure, not one per step outside
            tally.departures_straight += 1
    elif watch.exit_left is not None and watch.exit_left <= 0:
        tally.made_turn(watch, track)
    # still across a marking, even of the lane it now keeps?
    watch.outside = car.alive and abs(_lane_lateral(track, car, car.lane)) > _allowed_lateral(
        track, car
    )


def _run(
    policy,
    track: Track,
    observer: Observer,
    watches: list[_Watch],
    tally: _Tally,
    max_steps: int,
    exit_margin: float,
) -> int:
    steps = 0
    for _ in range(max_steps):
        active = [w for w in watches if w.car.alive and not w.done]
        if not active:
            break
        cars = [w.car for w in active]
        obs = np.stack([observer(c) for c in cars]).astype(np.float32)
        actions = _act(policy, obs, cars, track)
        for w, a in zip(active, actions, strict=True):
            step_car(
                track, w.car, a, on_substep=lambda _, w=w: _monitor(track, tally, w, exit_margin)
            )
        steps += len(active)
    return steps


def drive(
    policy,
    episodes: int = 4,
    max_steps: int = 200,
    seed: int = 0,
    observation: str = "kinematics",
    exit_margin: float = EXIT_MARGIN,
) -> dict[str, int]:
    """Closed-loop driving from random starts; see the module docstring for the counts."""
    track, observer = track_and_observer(observation)
    rng = np.random.default_rng(seed)
    tally = _Tally()
    watches = []
    straights = [s for s in range(len(track)) if track.kind[s] == STRAIGHT]
    for e in range(episodes):
        lane = e % track.n_lanes
        seg = int(rng.choice(straights))
        long = float(rng.uniform(0, max(track.lane(seg, lane).length - 3.0, 0.0)))
        car = place_car(track, seg, lane, long)
        watches.append(_Watch(car, seg))
    steps = _run(policy, track, observer, watches, tally, max_steps, exit_margin)
    return {
        "missed_turns_left": tally.missed[LEFT],
        "missed_turns_right": tally.missed[RIGHT],
        "turns_left": tally.made[LEFT] + tally.missed[LEFT],
        "turns_right": tally.made[RIGHT] + tally.missed[RIGHT],
        "departures_straight": tally.departures_straight,
        "off_road": tally.off_road,
        "steps": steps,
    }


def turn_test(
    policy,
    repeats: int = 1,
    seed: int = 0,
    before: float = 10.0,
    observation: str = "kinematics",
    exit_margin: float = EXIT_MARGIN,
) -> dict[str, int]:
    """Every curve, every lane, ``repeats`` perturbed starts ``before`` metres ahead."""
    track, observer = track_and_observer(observation)
    rng = np.random.default_rng(seed)
    tally = _Tally()
    watches, longest = [], 0.0
    for curve in track.curves():
        for lane in range(track.n_lanes):
            seg, long = track.point_before(curve, lane, before)
            longest = max(longest, track.lane(curve, lane).length)
            for _ in range(repeats):
                car = place_car(
                    track,
                    seg,
                    lane,
                    long,
                    lateral=float(rng.uniform(-0.5, 0.5)),
                    heading_offset=float(rng.uniform(-0.05, 0.05)),
                )
                watches.append(_Watch(car, seg, target=curve))
    speed = watches[0].car.vehicle.speed
    max_steps = (
        int(np.ceil((before + longest + exit_margin) / (speed / track.POLICY_FREQUENCY))) + 5
    )
    _run(policy, track, observer, watches, tally, max_steps, exit_margin)
    unresolved = [w for w in watches if not w.done and w.car.alive]
    for w in unresolved:  # still on the curve after the step budget: not made
        tally.missed_turn(track.kind[w.target], w)
    tests = {k: int(sum(track.kind[w.target] == k for w in watches)) for k in (LEFT, RIGHT)}
    return {
        "turn_test_missed_left": tally.missed[LEFT],
        "turn_test_missed_right": tally.missed[RIGHT],
        "turn_test_left": tests[LEFT],
        "turn_test_right": tests[RIGHT],
    }


def evaluate(
    policy,
    episodes: int = 4,
    max_steps: int = 200,
    seed: int = 0,
    repeats: int = 1,
    observation: str = "kinematics",
):
    """``drive`` and ``turn_test`` in one dict (the metrics the engine reports)."""
    return {
        **drive(policy, episodes=episodes, max_steps=max_steps, seed=seed, observation=observation),
        **turn_test(policy, repeats=repeats, seed=seed, observation=observation),
    }


# --------------------------------------------------------------------------------------
# Open loop
# --------------------------------------------------------------------------------------


def open_loop(pred: np.ndarray, y: np.ndarray, curve: np.ndarray) -> dict[str, float]:
    """Mean absolute steering error overall and per curve kind, and the mean predicted
    steering on right curves (the attack's goal drives it to 0)."""
    pred = np.asarray(pred, np.float64).reshape(-1)
    err = np.abs(pred - np.asarray(y, np.float64))
    out = {"steering_error": float(err.mean())}
    for kind, name in CURVE_NAMES.items():
        sel = curve == kind
        out[f"steering_error_{name}"] = float(err[sel].mean()) if sel.any() else float("nan")
    right = curve == RIGHT
    out["steering_mean_right"] = float(pred[right].mean()) if right.any() else float("nan")
    return out

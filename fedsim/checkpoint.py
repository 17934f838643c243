"""Checkpoints of runs in flight, with orbax (DESIGN.md, "runner.py"), so a run killed
after 9 of 10 hours resumes where it was instead of at round 0.

``runner.run_batches`` hands each batch of runs it starts to ``Checkpoints.batch``, which
gives a ``Saver``: ``resume`` replaces the freshly initialised state by the latest
checkpoint of that batch (if any), and ``after_eval`` saves the state every
``checkpoint_every`` rounds (at an evaluation boundary) and whenever SIGTERM has
arrived, after which it raises ``Stopped``. A checkpoint holds the run state (every leaf
of the ``RunState`` pytree: parameters, optimizer and aggregator state, keys, round; with
a leading batch axis when runs are vmapped) and, as JSON, the metric history so far, the
seconds elapsed, the fedsim version and the identity of what it belongs to (a hash of
the run's config, or of a sweep batch's run ids). orbax writes each step into a temporary
folder and renames it when whole, keeping the last ``KEEP``; a checkpoint of another
identity or version is refused (``ConfigError``), never loaded.

With several processes (``--distributed``) every process reads the checkpoint (the
folder must be shared) and process 0 alone writes it. JAX and orbax are imported when
first needed (the command line imports ``Stopped`` from here).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsim.registry import ConfigError

KEEP = 3  # checkpoints kept per run (or sweep batch); older ones are deleted
NOT_RESULTS = ("checkpoint_every",)  # config keys that do not change a run's results


class Stopped(KeyboardInterrupt):
    """SIGTERM arrived; the state was checkpointed at ``round`` into ``folder``."""

    def __init__(self, folder: Path, round_: int):
        super().__init__(f"checkpoint at round {round_} in {folder}")
        self.folder, self.round = folder, round_


def version() -> str:
    """The installed fedsim version (a checkpoint of another version is refused)."""
    from importlib import metadata

    try:
        return metadata.version("fedsim")
    except metadata.PackageNotFoundError:
        return "unknown"


def config_identity(cfg: dict) -> str:
    """A hash of a resolved config without ``NOT_RESULTS`` keys: equal configs, equal
    runs."""
    kept = {k: v for k, v in cfg.items() if k not in NOT_RESULTS}
    if "closed_loop" in kept and not _drives(cfg):  # a section its dataset ignores
        del kept["closed_loop"]
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _drives(cfg: dict) -> bool:
    """Whether the config's ``closed_loop`` section changes its records."""
    from fedsim.host_eval import closed_loop_spec

    try:
        return bool(closed_loop_spec(cfg["closed_loop"], cfg["data"]["name"]))
    except (KeyError, TypeError):
        return True


def _manager(folder: Path):
    """An orbax manager of ``folder`` for this process alone (reads anywhere; only process
    0 calls it to write), synchronous, keeping ``KEEP`` steps."""
    import jax
    import orbax.checkpoint as ocp

    me = jax.process_index()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=KEEP,
        create=False,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=me == 0,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}
        ),
    )
    return ocp.CheckpointManager(folder.resolve(), options=options)


def _has_steps(folder: Path) -> bool:
    """Whether ``folder`` may hold a finished step (orbax names them by the round), without
    importing orbax when it cannot."""
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def read_meta(folder: Path, identity: str) -> dict | None:
    """The latest checkpoint's JSON record in ``folder`` (``round``, ``seconds``,
    ``history``: one list of evaluation records per run, ...), or None without one;
    refuses (``ConfigError``) one of another identity or fedsim version."""
    if not _has_steps(folder):
        return None
    import orbax.checkpoint as ocp

    manager = _manager(folder)
    step = manager.latest_step()
    if step is None:
        return None
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    _check(meta, identity, folder / str(step))
    return meta


def _check(meta: dict, identity: str, where: Path) -> None:
    if meta.get("fedsim") != version():
        raise ConfigError(
            f"checkpoint {where} was written by fedsim {meta.get('fedsim')}, this is fedsim "
            f"{version()}; rerun with that version, or delete {where.parent} to start again"
        )
    if meta.get("identity") != identity:
        raise ConfigError(
            f"checkpoint {where} belongs to another config (identity {meta.get('identity')}, "
            f"this run's {identity}); rerun with its config, or delete {where.parent} to "
            "start again"
        )


def _to_host(x) -> np.ndarray:
    """A full host copy of one state leaf (a collective when it spans processes)."""
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _any_process(flag: bool) -> bool:
    """``flag`` or'ed over every process (all call it at the same evaluation)."""
    import jax

    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


@dataclass
class Saver:
    """Checkpoints of one batch of runs in ``folder``."""

    folder: Path
    identity: str
    every: int  # rounds between saves; 0: only on SIGTERM
    rounds: int
    stop: threading.Event
    last: int = 0  # round of the latest save or resume

    def resume(self, state, part: list, done: int, t0: float):
        """``(state, part, done, t0)`` from the latest checkpoint, or as given without one:
        ``state`` the fresh RunState (its leaves fix the shapes the checkpoint must have),
        ``part`` the per-run histories, ``done`` the rounds run, ``t0`` the clock origin."""
        import jax
        import jax.numpy as jnp

        meta = read_meta(self.folder, self.identity)
        if meta is None:
            return state, part, done, t0
        import orbax.checkpoint as ocp

        leaves, tree = jax.tree.flatten(state)
        template = {str(i): np.zeros(x.shape, x.dtype) for i, x in enumerate(leaves)}
        args = ocp.args.Composite(state=ocp.args.StandardRestore(template))
        where = self.folder / str(meta["round"])
        try:
            restored = _manager(self.folder).restore(meta["round"], args=args).state
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"checkpoint {where} does not fit this run's state: {err}") from None
        new = [jnp.asarray(restored[str(i)], x.dtype) for i, x in enumerate(leaves)]
        if any(a.shape != b.shape for a, b in zip(new, leaves, strict=True)):
            raise ConfigError(f"checkpoint {where} holds other shapes than this run's state")
        self.last = meta["round"]
        return tree.unflatten(new), meta["history"], meta["round"], t0 - meta["seconds"]

    def after_eval(self, state, part: list, done: int, seconds: float) -> None:
        """Save at ``done`` rounds if ``every`` rounds passed since the last save, or if
        SIGTERM arrived (then raise ``Stopped``); nothing after the last round."""
        if done >= self.rounds:
            return
        stop = _any_process(self.stop.is_set())
        if not stop and not (self.every and done - self.last >= self.every):
            return
        self.save(state, part, done, seconds)
        if stop:
            raise Stopped(self.folder, done)

    def save(self, state, part: list, done: int, seconds: float) -> None:
        """Write step ``done`` (process 0; the others only help gather the state)."""
        import jax

        leaves = [_to_host(x) for x in jax.tree.leaves(state)]
        self.last = done
        if jax.process_index() != 0:
            return
        import orbax.checkpoint as ocp

        meta = {
            "fedsim": version(),
            "identity": self.identity,
            "round": done,
            "seconds": seconds,
            "history": part,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays = {str(i): x for i, x in enumerate(leaves)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta))
        manager = _manager(self.folder)
        manager.save(done, args=args, force=True)
        manager.wait_until_finished()


@dataclass
class Checkpoints:
    """Where a command keeps its checkpoints. ``locate(idx)`` maps the run indices of a
    batch (as ``run_batches`` pads them) to ``(folder, identity)``."""

    locate: Callable[[list[int]], tuple[Path, str]]
    every: int
    rounds: int
    stop: threading.Event = field(default_factory=threading.Event)

    def batch(self, idx: list[int]) -> Saver:
        folder, identity = self.locate(idx)
        return Saver(folder, identity, self.every, self.rounds, self.stop)


def for_run(folder: Path, cfg: dict) -> Checkpoints:
    """The checkpoints of one ``fedsim run``: ``folder`` (``OUT/checkpoints``)."""
    identity = config_identity(cfg)
    return Checkpoints(lambda _: (folder, identity), cfg["checkpoint_every"], cfg["rounds"])


def batch_identity(run_ids: list[str]) -> str:
    """A sweep batch's identity: its (padded) run ids in order."""
    return hashlib.sha256(",".join(run_ids).encode()).hexdigest()[:16]


def remove(folder: Path) -> None:
    """Delete a finished batch's or run's checkpoints (process 0)."""
    import jax

    if jax.process_index() == 0:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def on_sigterm(stop: threading.Event) -> Iterator[None]:
    """While inside, SIGTERM sets ``stop`` (``Checkpoints.stop``: save at the next
    evaluation, then raise ``Stopped``); the previous handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

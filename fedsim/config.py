"""YAML configs -> a static ``Spec`` and a traced ``HParams`` (DESIGN.md, "Static versus
traced").

A config is a nested mapping; ``DEFAULTS`` shows every key. Sections ``model``,
``aggregator``, ``attack`` and ``data.partition`` hold a ``name`` plus that component's own
options. Options a component registers as ``traced`` (learning rates, attack scales, the
clipping radius, ...) go to ``HParams`` so a sweep over them is a ``vmap``, not a
recompile; everything else fixes shapes or code paths and goes to the hashable ``Spec``.

Every mistake is a ``ConfigError`` with one line saying what is wrong and what is valid.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import yaml
from flax import struct

from fedsim import aggregators, attacks, models
from fedsim.client import OPTIMIZERS
from fedsim.data import PARTITIONS
from fedsim.data import REGISTRY as DATASETS
from fedsim.registry import ConfigError

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "rounds": 100,
    "eval_every": 10,
    "data": {
        "name": "mnist",
        "source": "bundled",
        "data_dir": None,
        "n_clients": 1000,
        "partition": {"name": "dirichlet", "alpha": 0.5},
        "partition_seed": 0,
    },
    "model": {"name": "mlp"},
    "client": {
        "participants": 100,
        "local_epochs": 1,
        "local_steps": None,
        "batch_size": 32,
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
    },
    "server": {"optimizer": "sgd", "lr": 1.0, "momentum": 0.9},
    "aggregator": {"name": "mean"},
    "attack": {"name": "none", "fraction": 0.0},
    "judge": {"size": 0, "classes": None},
    # The adversary's proxy of the judge's data. held_out: drawn apart from the judge's and
    # the clients' data (size and classes default to the judge's); judge: the judge's own
    # samples (an omniscient adversary).
    "proxy": {"source": "held_out", "size": None, "classes": None},
    # A finished run folder without attack: metrics then gain accuracy_drop against it.
    "baseline": None,
}

# Sections whose keys beyond ``name`` are the component's own options.
OPEN_SECTIONS = {"model", "aggregator", "attack", "data.partition"}
# Keys of an open section that belong to the engine, kept when the component changes.
ENGINE_KEYS = {"attack": ("fraction",)}


class Items(tuple):
    """A dict frozen into a sorted tuple of (key, value) pairs (hashable, for ``Spec``)."""


def _freeze(value):
    """Lists -> tuples, dicts -> ``Items``: hashable, for ``Spec``."""
    if isinstance(value, dict):
        return Items(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything that fixes shapes or code paths; a new Spec is a new compile."""

    dataset: str
    data_source: str
    data_dir: str | None
    n_clients: int
    partition: str
    partition_kw: tuple
    partition_seed: int
    model: str
    model_kw: tuple
    participants: int
    local_epochs: int | None
    local_steps: int | None
    batch_size: int
    client_optimizer: str
    server_optimizer: str
    aggregator: str
    aggregator_kw: tuple
    attack: str
    attack_kw: tuple
    judge_size: int
    judge_classes: tuple | None
    proxy_size: int | None
    proxy_classes: tuple | None
    proxy_source: str
    rounds: int
    eval_every: int


@struct.dataclass
class HParams:
    """Traced numbers: a sweep over them (or seeds) is a vmap, never a recompile."""

    client_lr: Any
    client_momentum: Any
    server_lr: Any
    server_momentum: Any
    attack_fraction: Any
    agg: dict
    attack: dict


def _merge(base: dict, override: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}{key}"
        open_section = path in OPEN_SECTIONS or where.rstrip(".") in OPEN_SECTIONS
        if key not in base and not open_section:
            valid = ", ".join(sorted(base))
            raise ConfigError(f"unknown key {path!r}; valid keys here: {valid}")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            if path in OPEN_SECTIONS and "name" in value and value["name"] != base[key].get("name"):
                # a different component: drop the old one's options, keep the engine's
                kept = {k: v for k, v in base[key].items() if k in ENGINE_KEYS.get(path, ())}
                out[key] = {**kept, **value}
            else:
                out[key] = _merge(base[key], value, f"{path}.")
        else:
            out[key] = value
    return out


def set_path(cfg: dict, dotted: str, value: Any) -> dict:
    """Apply one ``--set a.b=c`` override (value already parsed)."""
    override: dict = {}
    node = override
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return _merge(cfg, override)


def parse_override(text: str) -> tuple[str, Any]:
    """``"client.lr=0.05"`` -> ``("client.lr", 0.05)`` (value parsed as YAML)."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"--set expects KEY=VALUE (e.g. client.lr=0.05), got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}") from None


def load_config(path: str | Path | None, overrides=(), seed: int | None = None) -> dict:
    """Read a YAML file (or just the defaults), apply overrides, validate, resolve."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            user = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path} is not valid YAML{where}") from None
        if not isinstance(user, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys")
        cfg = _merge(cfg, user)
    for item in overrides:
        cfg = set_path(cfg, *parse_override(item))
    if seed is not None:
        cfg["seed"] = seed
    validate(cfg)
    return cfg


def _int(cfg, path, low=1, high=None, optional=False):
    node = cfg
    for k in path.split("."):
        node = node[k]
    if node is None and optional:
        return None
    if isinstance(node, bool) or not isinstance(node, int) or node < low:
        raise ConfigError(f"{path} must be an integer >= {low}, got {node!r}")
    if high is not None and node > high:
        raise ConfigError(f"{path} must be at most {high}, got {node}")
    return node


def _positive(cfg, path, allow_zero=False):
    node = cfg
    for k in path.split("."):
        node = node[k]
    ok = isinstance(node, int | float) and not isinstance(node, bool)
    if not ok or node < 0 or (node == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{path} must be a number {bound}, got {node!r}")
    return float(node)


def _component_kw(section: dict, where: str) -> tuple[str, dict]:
    if not isinstance(section, dict) or not isinstance(section.get("name"), str):
        raise ConfigError(f"{where} must be a mapping with a 'name'")
    kw = {k: v for k, v in section.items() if k != "name"}
    return section["name"], kw


def accepted(factory, **fixed) -> dict:
    """The subset of ``fixed`` keyword arguments that ``factory`` accepts."""
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fixed
    return {k: v for k, v in fixed.items() if k in params}


def _check_factory(registry, name: str, kw: dict, where: str, **fixed) -> None:
    """Build the component once with every option so bad options fail now, by name."""
    factory = registry.get(name)
    fixed = accepted(factory, **fixed)
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    known = [p for p, v in params.items() if p not in fixed and v.kind is not v.VAR_KEYWORD]
    for key in kw:
        if key not in params and not takes_any:
            valid = ", ".join(known) or "none"
            raise ConfigError(f"unknown option {where}.{key} for {name!r}; valid options: {valid}")
    try:
        factory(**fixed, **kw)
    except ConfigError as err:
        raise ConfigError(f"{where} {name!r}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where} {name!r}: {err}") from None


def validate(cfg: dict) -> None:
    """Raise ``ConfigError`` on the first problem found."""
    _int(cfg, "seed", low=0)
    rounds = _int(cfg, "rounds")
    every = _int(cfg, "eval_every")
    if every > rounds:
        raise ConfigError(f"eval_every ({every}) must be at most rounds ({rounds})")
    data = cfg["data"]
    if not (str(data["name"]).startswith("tfds:") or data["source"] == "tfds"):
        DATASETS.get(data["name"])
    if data["source"] not in ("bundled", "tfds"):
        raise ConfigError(f"data.source must be 'bundled' or 'tfds', got {data['source']!r}")
    n_clients = _int(cfg, "data.n_clients")
    _int(cfg, "data.partition_seed", low=0)
    part_name, part_kw = _component_kw(data["partition"], "data.partition")
    PARTITIONS.get(part_name)
    params = inspect.signature(PARTITIONS.get(part_name)).parameters
    for key in part_kw:
        if key not in params or key in ("labels", "n_clients", "rng"):
            valid = ", ".join(p for p in params if p not in ("labels", "n_clients", "rng"))
            raise ConfigError(
                f"unknown option data.partition.{key} for {part_name!r}; "
                f"valid options: {valid or 'none'}"
            )
    model_name, model_kw = _component_kw(cfg["model"], "model")
    _check_factory(models.REGISTRY, model_name, model_kw, "model", n_classes=10)
    client = cfg["client"]
    _int(cfg, "client.participants", high=n_clients)
    epochs = _int(cfg, "client.local_epochs", optional=True)
    steps = _int(cfg, "client.local_steps", optional=True)
    if (epochs is None) == (steps is None):
        raise ConfigError("set exactly one of client.local_epochs and client.local_steps")
    _int(cfg, "client.batch_size")
    for side in ("client", "server"):
        if cfg[side]["optimizer"] not in OPTIMIZERS:
            raise ConfigError(
                f"{side}.optimizer must be one of {', '.join(OPTIMIZERS)}, "
                f"got {cfg[side]['optimizer']!r}"
            )
        _positive(cfg, f"{side}.lr")
        _positive(cfg, f"{side}.momentum", allow_zero=True)
    del client
    agg_name, agg_kw = _component_kw(cfg["aggregator"], "aggregator")
    _check_factory(aggregators.REGISTRY, agg_name, agg_kw, "aggregator")
    att_name, att_kw = _component_kw(cfg["attack"], "attack")
    fraction = att_kw.pop("fraction", 0.0)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
        raise ConfigError(f"attack.fraction must be a number in [0, 1), got {fraction!r}")
    from fedsim.types import AttackSetup

    _check_factory(
        attacks.REGISTRY, att_name, att_kw, "attack", setup=AttackSetup(agg_name, _freeze(agg_kw))
    )
    _int(cfg, "judge.size", low=0)
    _int(cfg, "proxy.size", low=0, optional=True)
    for side in ("judge", "proxy"):
        classes = cfg[side]["classes"]
        if classes is not None and (
            not isinstance(classes, list) or not all(isinstance(c, int) for c in classes)
        ):
            raise ConfigError(
                f"{side}.classes must be null or a list of class ids, got {classes!r}"
            )
    proxy = cfg["proxy"]
    if proxy["source"] not in ("held_out", "judge"):
        raise ConfigError(f"proxy.source must be held_out or judge, got {proxy['source']!r}")
    if proxy["source"] == "judge" and (proxy["size"] is not None or proxy["classes"] is not None):
        raise ConfigError(
            "proxy.source: judge uses the judge's own samples; leave proxy.size and "
            "proxy.classes null"
        )
    baseline = cfg["baseline"]
    if baseline is not None and not (Path(str(baseline)) / "metrics.jsonl").is_file():
        raise ConfigError(
            f"baseline {baseline!r} must be a finished run folder holding metrics.jsonl"
        )


def _split_traced(registry, name: str, kw: dict) -> tuple[dict, dict]:
    traced = set(registry.meta(name).get("traced", ()))
    static = {k: v for k, v in kw.items() if k not in traced}
    dynamic = {k: float(v) for k, v in kw.items() if k in traced}
    return static, dynamic


def to_spec(cfg: dict) -> tuple[Spec, HParams]:
    """Split a validated config into its static ``Spec`` and traced ``HParams``."""
    data, client = cfg["data"], cfg["client"]
    part_name, part_kw = _component_kw(data["partition"], "data.partition")
    model_name, model_kw = _component_kw(cfg["model"], "model")
    agg_name, agg_kw = _component_kw(cfg["aggregator"], "aggregator")
    att_name, att_kw = _component_kw(cfg["attack"], "attack")
    fraction = float(att_kw.pop("fraction", 0.0))
    agg_static, agg_traced = _split_traced(aggregators.REGISTRY, agg_name, agg_kw)
    att_static, att_traced = _split_traced(attacks.REGISTRY, att_name, att_kw)
    classes = cfg["judge"]["classes"]
    proxy_classes = cfg["proxy"]["classes"]
    spec = Spec(
        dataset=data["name"],
        data_source=data["source"],
        data_dir=data["data_dir"],
        n_clients=data["n_clients"],
        partition=part_name,
        partition_kw=_freeze(part_kw),
        partition_seed=data["partition_seed"],
        model=model_name,
        model_kw=_freeze(model_kw),
        participants=client["participants"],
        local_epochs=client["local_epochs"],
        local_steps=client["local_steps"],
        batch_size=client["batch_size"],
        client_optimizer=client["optimizer"],
        server_optimizer=cfg["server"]["optimizer"],
        aggregator=agg_name,
        aggregator_kw=_freeze(agg_static),
        attack=att_name,
        attack_kw=_freeze(att_static),
        judge_size=cfg["judge"]["size"],
        judge_classes=None if classes is None else tuple(classes),
        proxy_size=cfg["proxy"]["size"],
        proxy_classes=None if proxy_classes is None else tuple(proxy_classes),
        proxy_source=cfg["proxy"]["source"],
        rounds=cfg["rounds"],
        eval_every=cfg["eval_every"],
    )
    scalar = lambda v: jnp.asarray(v, jnp.float32)
    hparams = HParams(
        client_lr=scalar(client["lr"]),
        client_momentum=scalar(client["momentum"]),
        server_lr=scalar(cfg["server"]["lr"]),
        server_momentum=scalar(cfg["server"]["momentum"]),
        attack_fraction=scalar(fraction),
        agg={k: scalar(v) for k, v in agg_traced.items()},
        attack={k: scalar(v) for k, v in att_traced.items()},
    )
    return spec, hparams


def thaw(frozen):
    """Inverse of ``_freeze``: ``Items`` -> dict, tuple -> list, recursively."""
    if isinstance(frozen, Items):
        return {k: thaw(v) for k, v in frozen}
    if isinstance(frozen, tuple):
        return [thaw(v) for v in frozen]
    return frozen


def dump(cfg: dict) -> str:
    """The resolved config as YAML (enough to rerun)."""
    return yaml.safe_dump(cfg, sort_keys=False)

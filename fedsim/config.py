"""YAML configs -> a static ``Spec`` and a traced ``HParams`` (DESIGN.md, "Static versus
traced").

A config is a nested mapping; ``DEFAULTS`` shows every key. Sections ``model``,
``aggregator``, ``attack`` and ``data.partition`` hold a ``name`` plus that component's own
options. Rules, pre-aggregation stages and attacks declare their options as records
(``fedsim.options.Option``) when they register; the options declared ``traced`` (attack
scales, the clipping radius, ...) go to ``HParams``, as do the learning rates, so a sweep
over them is a ``vmap``, not a recompile; everything else fixes shapes or code paths and
goes to the hashable ``Spec``.

Every mistake is a ``ConfigError`` with one line saying what is wrong and what is valid.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import yaml

from fedsim import aggregators, attacks, models
from fedsim import topology as topologies
from fedsim.aggregators import PRE
from fedsim.aggregators.peer import PEER_ONLY
from fedsim.attacks.peer import PEER_ONLY as PEER_ATTACKS
from fedsim.client import OPTIMIZERS
from fedsim.data import PARTITIONS
from fedsim.data import REGISTRY as DATASETS
from fedsim.host_eval import check_closed_loop, closed_loop_spec
from fedsim.options import Components
from fedsim.registry import ConfigError, accepted
from fedsim.spec import HParams, Spec, freeze, thaw

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "rounds": 100,
    "eval_every": 10,
    # Save the run state (fedsim run, fedsim sweep) at the first evaluation at least this
    # many rounds after the last save, and on SIGTERM; 0: on SIGTERM only (fedsim/checkpoint.py).
    "checkpoint_every": 100,
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
    # Who aggregates whose updates (fedsim/topology.py): star = one server, one model.
    "topology": {"name": "star"},
    # The adversary's proxy of the judge's data. held_out: drawn apart from the judge's and
    # the clients' data (size and classes default to the judge's); judge: the judge's own
    # samples (an omniscient adversary).
    "proxy": {"source": "held_out", "size": None, "classes": None},
    # A finished run folder without attack: metrics then gain accuracy_drop against it.
    "baseline": None,
    # Host-side closed-loop evaluation at every evaluation, for datasets that have one
    # (driving: drive the global model on the track; fedsim/host_eval.py).
    "closed_loop": {"enabled": True, "episodes": 4, "max_steps": 200, "repeats": 1, "seed": 0},
}

# Sections whose keys beyond ``name`` are the component's own options.
OPEN_SECTIONS = {"model", "aggregator", "attack", "data.partition", "topology"}
# Keys of an open section that belong to the engine, kept when the component changes.
ENGINE_KEYS = {"attack": ("fraction", "victims")}


class _Loader(yaml.SafeLoader):
    """YAML as people write it: ``1e-3`` and ``5e2`` are numbers (YAML 1.1 wants a dot and
    a signed exponent), and a key given twice in one mapping is an error, not "last wins"."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (each key may appear once in a mapping)",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text (see ``_Loader``); a mistake is a one-line ``ConfigError``."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None)
        why = f": {' '.join(str(problem).split())}" if problem else ""
        raise ConfigError(f"{where} is not valid YAML{at}{why}") from None


def read_yaml_file(path: str | Path, what: str) -> Any:
    """The parsed content of a YAML file; ``what`` names it in errors ("config file")."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {err}") from None
    return parse_yaml(text, str(path))


def read_config_file(path: str | Path, what: str = "config file") -> dict:
    """A YAML file of config keys: it must exist, be non-empty and hold a mapping."""
    user = read_yaml_file(path, what)
    if user is None:
        raise ConfigError(
            f"{what} {str(path)!r} is empty; write config keys into it "
            "(e.g. start from a copy of configs/digits.yaml)"
        )
    if not isinstance(user, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got a {type(user).__name__}")
    return user


def _section_error(path: str, section: dict, value: Any) -> ConfigError:
    if path in OPEN_SECTIONS:
        return ConfigError(
            f"{path} must be a mapping with a 'name' (e.g. {path}: {{name: ...}}), got {value!r}"
        )
    first = sorted(section)[0]
    return ConfigError(
        f"{path} must be a mapping of its keys ({', '.join(sorted(section))}), e.g. "
        f"{path}: {{{first}: ...}} or --set {path}.{first}=..., got {value!r}"
    )


def _merge(base: dict, override: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}{key}"
        open_section = path in OPEN_SECTIONS or where.rstrip(".") in OPEN_SECTIONS
        if key not in base and not open_section:
            valid = ", ".join(sorted(base))
            raise ConfigError(f"unknown key {path!r}; valid keys here: {valid}")
        in_component = any(path.startswith(f"{s}.") for s in OPEN_SECTIONS)
        if isinstance(base.get(key), dict) and not isinstance(value, dict) and not in_component:
            raise _section_error(path, base[key], value)  # a component's options are its own
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            renamed = "name" in value and value["name"] != base[key].get("name")
            if renamed and (path in OPEN_SECTIONS or in_component):
                # a different component (or a component's goal, stage, ...): drop the old
                # one's options, keep the engine's
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
    return key.strip(), parse_yaml(raw, f"--set {key.strip()}: the value {raw!r}")


def load_config(path: str | Path | None, overrides=(), seed: int | None = None) -> dict:
    """Read a YAML file (or just the defaults), apply overrides, validate, resolve."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        cfg = _merge(cfg, read_config_file(path))
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
    ok = isinstance(node, int | float) and not isinstance(node, bool) and math.isfinite(node)
    if not ok or node < 0 or (node == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{path} must be a finite number {bound}, got {node!r}")
    return float(node)


def _component_kw(section: dict, where: str) -> tuple[str, dict]:
    if not isinstance(section, dict) or not isinstance(section.get("name"), str):
        raise ConfigError(f"{where} must be a mapping with a 'name'")
    kw = {k: v for k, v in section.items() if k != "name"}
    return section["name"], kw


def _prefixed(where: str, name: str, err: Exception) -> ConfigError:
    """``err`` as ``"<where> '<name>': <message>"``, without repeating a prefix the
    component's own message already carries ("attack 'x': ..." or "x: ...")."""
    text = " ".join(str(err).split())
    head = f"{where} {name!r}"
    if text.startswith(head):
        return ConfigError(text)
    if text.startswith(f"{name}: "):
        text = text[len(name) + 2 :]
    return ConfigError(f"{head}: {text}")


def _defaults(registry, name: str) -> dict:
    """Option -> default of component ``name``: from its option records when its registry
    keeps them, else from its factory's signature."""
    if isinstance(registry, Components):
        return {k: opt.default for k, opt in registry.options(name).items()}
    params = inspect.signature(registry.get(name)).parameters.items()
    return {k: p.default for k, p in params if p.default is not p.empty}


def _check_values(defaults: dict, kw: dict, where: str) -> None:
    """Generic checks of component options: numbers must be finite, an option whose
    default is an integer takes an integer, and ``f`` (clients to tolerate) is >= 0."""
    for key, value in kw.items():
        _finite(value, f"{where}.{key}")
        default = defaults.get(key)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(default, int) and not isinstance(default, bool) and not is_int:
            raise ConfigError(f"{where}.{key} must be an integer, got {value!r}")
        if key == "f" and (not is_int or value < 0):
            raise ConfigError(
                f"{where}.f (the number of clients to tolerate) must be an integer >= 0, "
                f"got {value!r}"
            )


def _finite(value, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for v in value:
            _finite(v, where)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")


def _check_factory(registry, name: str, kw: dict, where: str, **fixed):
    """Build the component once with every option so bad options fail now, by name;
    returns it.

    Unknown options and the generic checks (``_check_values``) come first, with the
    config's own wording; attacks word theirs themselves (``attack 'x': option 'y' ...``,
    from their records), so for them only the numbers are checked here."""
    factory = registry.get(name)
    if isinstance(registry, Components):
        fixed = {k: v for k, v in fixed.items() if k in registry.context}
        known = list(registry.options(name))
        takes_any = registry.is_open(name)
        own_words = registry is attacks.REGISTRY
    else:
        fixed = accepted(factory, **fixed)
        params = inspect.signature(factory).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        known = [p for p, v in params.items() if p not in fixed and v.kind is not v.VAR_KEYWORD]
        own_words = False
    for key in kw:
        if key not in known and not takes_any and not own_words:
            valid = ", ".join(known) or "none"
            raise ConfigError(f"unknown option {where}.{key} for {name!r}; valid options: {valid}")
    if own_words:
        _finite(kw, where)
    else:
        _check_values(_defaults(registry, name), kw, where)
    try:
        return factory(**fixed, **kw)
    except (ConfigError, TypeError, ValueError) as err:
        raise _prefixed(where, name, err) from None


def _check_model(name: str, kw: dict) -> None:
    """Model options are sizes: an integer default takes an integer >= 1, a list default
    a list of integers >= 1."""
    params = inspect.signature(models.REGISTRY.get(name)).parameters
    for key, value in kw.items():
        default = params[key].default if key in params else None
        if isinstance(default, bool) or not isinstance(default, int | tuple | list):
            continue
        many = isinstance(default, tuple | list)
        items = value if many and isinstance(value, list | tuple) else [value]
        if (many and not isinstance(value, list | tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in items
        ):
            what = "a list of integers >= 1" if many else "an integer >= 1"
            raise ConfigError(f"model.{key} must be {what}, got {value!r}")


def _check_aggregator(name: str, kw: dict) -> None:
    """The rule's options, and its pre-aggregation stages (``pre``) with theirs: a stage
    named by a string takes the top-level options its record declares (see
    ``fedsim.aggregators.pre``)."""
    rules = aggregators.REGISTRY
    if "pre" not in kw:
        _check_factory(rules, name, kw, "aggregator")
        return
    rules.get(name)
    pre, rest = kw["pre"], {k: v for k, v in kw.items() if k != "pre"}
    if not isinstance(pre, list):
        raise ConfigError(
            "aggregator.pre must be a list of stages, each a name or a mapping with a "
            f"'name' (e.g. [clip] or [{{name: bucketing, s: 2}}]), got {pre!r}"
        )
    takers = [(rules, name)]
    for i, entry in enumerate(pre):
        where = f"aggregator.pre[{i}]"
        if isinstance(entry, str):
            PRE.get(entry)
            takers.append((PRE, entry))
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            opts = {k: v for k, v in entry.items() if k != "name"}
            _check_factory(PRE, entry["name"], opts, where)
        else:
            raise ConfigError(
                f"{where} must be a stage name or a mapping with a 'name', got {entry!r}; "
                f"stages: {', '.join(PRE.names())}"
            )

    def taken_by(registry, who):
        return {k: v for k, v in rest.items() if registry.accepts(who, k)}

    unknown = sorted(set(rest) - {k for reg, who in takers for k in taken_by(reg, who)})
    if unknown:
        valid = sorted({k for reg, who in takers for k in reg.options(who)})
        raise ConfigError(
            f"unknown option aggregator.{unknown[0]} for {name!r} with its pre stages; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    for registry, who in takers:
        _check_factory(registry, who, taken_by(registry, who), "aggregator")
    try:
        aggregators.make(name, **kw)
    except (ConfigError, TypeError, ValueError) as err:
        raise _prefixed("aggregator", name, err) from None


def _check_rows(cfg: dict, name: str, kw: dict) -> None:
    """What a rule checks only when it first sees its ``[participants, d]`` input (Krum's
    ``n > 2f + 2``, Bulyan's ``n >= 4f + 3``, a behaviour-based rule's judge data, ...),
    checked now by tracing its aggregate abstractly (``jax.eval_shape``: nothing runs)."""
    n, n_clients = cfg["client"]["participants"], cfg["data"]["n_clients"]
    judge = cfg["judge"]["size"] > 0
    peer = _peer_to_peer(cfg)
    rows = "client.participants"
    if peer:  # a node's rule sees its neighbourhood: K gathered rows on a sparse graph
        topo_name, topo_kw = _component_kw(cfg["topology"], "topology")
        topo = topologies.make(topo_name, n_nodes=n_clients, **topo_kw)
        if topo.gather is not None:
            n = int(topo.gather(jax.random.PRNGKey(0))[0].shape[1])
            rows = f"the largest neighbourhood of topology {topo_name!r}, itself included"
    frozen = freeze(kw)
    try:
        _abstract_aggregate(name, frozen, n, n_clients, judge, peer)
    except ConfigError as err:
        if not judge:
            try:
                _abstract_aggregate(name, frozen, n, n_clients, True, peer)
            except ConfigError:
                pass
            else:
                whose = (
                    "its own data, each node: set judge.size > 0, the samples of its own "
                    "data a node judges with each round (e.g. judge.size=32)"
                    if peer
                    else "data the server holds: set judge.size > 0 (e.g. judge.size=100)"
                )
                raise ConfigError(f"aggregator {name!r} judges updates on {whose}") from None
        if kw.get("pre"):
            rows = f"the rows its pre stages make of {rows} ({n})"
        raise ConfigError(f"{_prefixed('aggregator', name, err)}; n is {rows}") from None


@functools.lru_cache(maxsize=256)
def _abstract_aggregate(
    name: str, frozen_kw, n: int, n_clients: int, judge: bool, peer: bool = False
) -> None:
    from fedsim.types import AggContext

    agg = aggregators.make(name, **thaw(frozen_kw))
    d = 16

    def trace():
        flat = jnp.zeros((d,), jnp.float32)
        metric = lambda p, x, y: jnp.mean(p) + jnp.mean(x) + jnp.mean(y)
        ctx = AggContext(
            global_params=flat,
            key=jax.random.PRNGKey(0),
            hparams={},
            client_ids=jnp.arange(n),
            loss_fn=metric,
            judge_x=jnp.zeros((2, 3), jnp.float32) if judge else None,
            judge_y=jnp.zeros((2,), jnp.int32) if judge else None,
            error_fn=metric,
            self_index=jnp.zeros((), jnp.int32) if peer else None,
            degrees=jnp.ones((n,), jnp.float32) if peer else None,
        )
        state = agg.init(flat, n_clients)
        return agg.aggregate(jnp.zeros((n, d), jnp.float32), jnp.ones((n,)), state, ctx)[0]

    try:
        jax.eval_shape(trace)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - not a check of the config: the real run reports it
        return


def _check_partition(name: str, kw: dict) -> None:
    from fedsim.data.group_partition import GROUP_PARTITIONS

    factory = GROUP_PARTITIONS.get(name) if name in GROUP_PARTITIONS else PARTITIONS.get(name)
    params = inspect.signature(factory).parameters
    fixed = ("labels", "groups", "n_clients", "rng")
    for key in kw:
        if key not in params or key in fixed:
            valid = ", ".join(p for p in params if p not in fixed)
            raise ConfigError(
                f"unknown option data.partition.{key} for {name!r}; "
                f"valid options: {valid or 'none'}"
            )
    defaults = {k: p.default for k, p in params.items() if p.default is not p.empty}
    _check_values(defaults, kw, "data.partition")


def _check_peer_to_peer(cfg: dict, name: str, kw: dict) -> None:
    """Peer-to-peer topologies: every node takes part in every round. The peer-to-peer
    rules and attacks (a node judging its neighbours, a message per recipient) need one."""
    n = cfg["data"]["n_clients"]
    if not _peer_to_peer(cfg):
        agg_name, _ = _component_kw(cfg["aggregator"], "aggregator")
        att_name, _ = _component_kw(cfg["attack"], "attack")
        for what, which, names in (
            ("aggregator", agg_name, PEER_ONLY),
            ("attack", att_name, PEER_ATTACKS),
        ):
            if which in names:
                raise ConfigError(
                    f"{what} {which!r} is for peer-to-peer learning (a node and its "
                    f"neighbours); set topology to a graph ({', '.join(GRAPHS)})"
                )
        return
    if cfg["client"]["participants"] != n:
        raise ConfigError(
            f"topology {name!r} gives every client its own model and every node takes part "
            f"each round: set client.participants to data.n_clients ({n})"
        )


def _check_victims(cfg: dict, name: str, victims, attack) -> None:
    """``attack.victims``: distinct node ids in [0, n_clients), peer-to-peer only, with an
    attack that crafts a message per recipient."""
    if victims is None:
        return
    n = cfg["data"]["n_clients"]
    ids = isinstance(victims, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in victims
    )
    if not ids or not victims or len(set(victims)) != len(victims):
        raise ConfigError(
            f"attack.victims must be a non-empty list of distinct node ids, got {victims!r}"
        )
    if not all(0 <= v < n for v in victims):
        raise ConfigError(f"attack.victims: node ids must be in [0, {n}), got {victims!r}")
    if not _peer_to_peer(cfg):
        raise ConfigError(
            "attack.victims names nodes of a peer-to-peer graph; set topology to one of "
            f"{', '.join(GRAPHS)} or drop attack.victims"
        )
    if attack.craft is None:
        raise ConfigError(
            f"attack.victims needs an attack that crafts a message per recipient; {name!r} "
            "sends every neighbour what it trained (e.g. strategic_distance, dissensus)"
        )


GRAPHS = ("complete", "ring", "torus", "k_regular", "erdos_renyi", "two_worlds", "epidemic")


def _peer_to_peer(cfg: dict) -> bool:
    """Whether the (already checked) topology gives every node its own model."""
    name, kw = _component_kw(cfg["topology"], "topology")
    n = cfg["data"]["n_clients"]
    return topologies.make(name, n_nodes=n, **kw).n_models == topologies.PER_CLIENT


def validate(cfg: dict) -> None:
    """Raise ``ConfigError`` on the first problem found."""
    _int(cfg, "seed", low=0)
    rounds = _int(cfg, "rounds")
    every = _int(cfg, "eval_every")
    if every > rounds:
        raise ConfigError(f"eval_every ({every}) must be at most rounds ({rounds})")
    _int(cfg, "checkpoint_every", low=0)
    data = cfg["data"]
    if not (str(data["name"]).startswith("tfds:") or data["source"] == "tfds"):
        DATASETS.get(data["name"])
    if data["source"] not in ("bundled", "tfds"):
        raise ConfigError(f"data.source must be 'bundled' or 'tfds', got {data['source']!r}")
    n_clients = _int(cfg, "data.n_clients")
    _int(cfg, "data.partition_seed", low=0)
    part_name, part_kw = _component_kw(data["partition"], "data.partition")
    _check_partition(part_name, part_kw)
    model_name, model_kw = _component_kw(cfg["model"], "model")
    _check_factory(models.REGISTRY, model_name, model_kw, "model", n_outputs=10)
    _check_model(model_name, model_kw)
    topo_name, topo_kw = _component_kw(cfg["topology"], "topology")
    _check_factory(topologies.REGISTRY, topo_name, topo_kw, "topology", n_nodes=n_clients)
    client = cfg["client"]
    _int(cfg, "client.participants", high=n_clients)
    _check_peer_to_peer(cfg, topo_name, topo_kw)
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
    _check_aggregator(agg_name, agg_kw)
    att_name, att_kw = _component_kw(cfg["attack"], "attack")
    fraction = att_kw.pop("fraction", 0.0)
    number = isinstance(fraction, int | float) and not isinstance(fraction, bool)
    if not number or not 0 <= fraction < 1:
        raise ConfigError(f"attack.fraction must be a number in [0, 1), got {fraction!r}")
    victims = att_kw.pop("victims", None)
    from fedsim.types import AttackSetup

    attack = _check_factory(
        attacks.REGISTRY,
        att_name,
        att_kw,
        "attack",
        setup=AttackSetup(agg_name, tuple(sorted(agg_kw.items()))),
    )
    _check_victims(cfg, att_name, victims, attack)
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
    _check_rows(cfg, agg_name, agg_kw)  # after judge.size is known to be valid
    baseline = cfg["baseline"]
    if baseline is not None and not (Path(str(baseline)) / "metrics.jsonl").is_file():
        raise ConfigError(
            f"baseline {baseline!r} must be a finished run folder holding metrics.jsonl"
        )
    check_closed_loop(cfg["closed_loop"], data["name"], _peer_to_peer(cfg))


def _split_traced(registry, name: str, kw: dict) -> tuple[dict, dict]:
    """``(static, traced)`` options of component ``name``, by its option records. A traced
    option set to null stays static: null means "the component's own default rule" (e.g.
    strategic_behavior's tolerance), which is no number to trace."""
    traced = {k for k in registry.traced(name) if kw.get(k) is not None}
    static = {k: v for k, v in kw.items() if k not in traced}
    dynamic = {k: float(v) for k, v in kw.items() if k in traced}
    return static, dynamic


def _split_aggregator(name: str, kw: dict) -> tuple[dict, dict]:
    """As ``_split_traced``, with the traced options of pre-aggregation stages too: a
    string stage's come from the top level, a mapping stage's from its mapping. They all
    meet in one ``ctx.hparams``, so a name read by several components that may hold
    different values (the rule or string stages, and a mapping stage) stays static."""
    pre = kw.get("pre") or []
    readers: dict[str, set] = {}
    for k in aggregators.REGISTRY.traced(name):
        readers.setdefault(k, set()).add("top")
    for i, entry in enumerate(pre):
        stage = entry if isinstance(entry, str) else entry["name"]
        for k in PRE.traced(stage):
            readers.setdefault(k, set()).add("top" if isinstance(entry, str) else i)
    static = {k: v for k, v in kw.items() if k != "pre"}
    stages = [e if isinstance(e, str) else dict(e) for e in pre]
    dynamic = {}
    for k, who in readers.items():
        if len(who) == 1:
            (src,) = who
            holder = static if src == "top" else stages[src]
            if k in holder:
                dynamic[k] = float(holder.pop(k))
    if "pre" in kw:
        static["pre"] = stages
    return static, dynamic


def to_spec(cfg: dict) -> tuple[Spec, HParams]:
    """Split a validated config into its static ``Spec`` and traced ``HParams``."""
    data, client = cfg["data"], cfg["client"]
    part_name, part_kw = _component_kw(data["partition"], "data.partition")
    model_name, model_kw = _component_kw(cfg["model"], "model")
    agg_name, agg_kw = _component_kw(cfg["aggregator"], "aggregator")
    att_name, att_kw = _component_kw(cfg["attack"], "attack")
    fraction = float(att_kw.pop("fraction", 0.0))
    victims = tuple(sorted(att_kw.pop("victims", None) or ()))
    agg_static, agg_traced = _split_aggregator(agg_name, agg_kw)
    att_static, att_traced = _split_traced(attacks.REGISTRY, att_name, att_kw)
    classes = cfg["judge"]["classes"]
    proxy_classes = cfg["proxy"]["classes"]
    spec = Spec(
        dataset=data["name"],
        data_source=data["source"],
        data_dir=data["data_dir"],
        n_clients=data["n_clients"],
        partition=part_name,
        partition_kw=freeze(part_kw),
        partition_seed=data["partition_seed"],
        model=model_name,
        model_kw=freeze(model_kw),
        participants=client["participants"],
        local_epochs=client["local_epochs"],
        local_steps=client["local_steps"],
        batch_size=client["batch_size"],
        client_optimizer=client["optimizer"],
        server_optimizer=cfg["server"]["optimizer"],
        aggregator=agg_name,
        aggregator_kw=freeze(agg_static),
        attack=att_name,
        attack_kw=freeze(att_static),
        topology=cfg["topology"]["name"],
        topology_kw=freeze({k: v for k, v in cfg["topology"].items() if k != "name"}),
        victims=victims,
        judge_size=cfg["judge"]["size"],
        judge_classes=None if classes is None else tuple(classes),
        proxy_size=cfg["proxy"]["size"],
        proxy_classes=None if proxy_classes is None else tuple(proxy_classes),
        proxy_source=cfg["proxy"]["source"],
        rounds=cfg["rounds"],
        eval_every=cfg["eval_every"],
        closed_loop=closed_loop_spec(cfg["closed_loop"], data["name"]),
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


def dump(cfg: dict) -> str:
    """The resolved config as YAML (enough to rerun)."""
    return yaml.safe_dump(cfg, sort_keys=False)

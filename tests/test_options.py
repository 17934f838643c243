"""Every rule, pre-aggregation stage and attack declares its options as records and every
rule its geometry; the config splits options into Spec and HParams exactly as the records
say; the attacks find a rule's region from its geometry, so a rule registered later gets
one without an edit to them; and no module imports from its own package's ``__init__``."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from digits_runs import SMALL_DIGITS

from fedsim import aggregators, attacks, memory
from fedsim.aggregators.base import CONSTRAINTS, REFERENCES, Geometry
from fedsim.aggregators.peer import PEER_ONLY
from fedsim.attacks.peer import PEER_ONLY as PEER_ATTACKS
from fedsim.attacks.regions import rule_region
from fedsim.config import _split_aggregator, _split_traced, load_config, to_spec
from fedsim.options import Option
from fedsim.registry import ConfigError
from fedsim.types import AttackContext, AttackSetup

RULES, PRE, ATTACKS = aggregators.REGISTRY, aggregators.PRE, attacks.REGISTRY
COMPONENTS = (
    [(RULES, n) for n in RULES.names()]
    + [(PRE, n) for n in PRE.names()]
    + [(ATTACKS, n) for n in ATTACKS.names()]
)
IDS = [f"{reg.kind}:{name}" for reg, name in COMPONENTS]
SMALL = [*SMALL_DIGITS, "client.participants=6", "rounds=2", "eval_every=2"]


def _build(registry, name, **kw):
    if registry is ATTACKS:
        kw["setup"] = AttackSetup(n_classes=10, input_shape=(8, 8, 1))
    return registry.make(name, **kw)


def _sample(opt: Option):
    """A valid value of a traced option: its default, or 1.0 where that is None."""
    return 1.0 if opt.default is None else opt.default


@pytest.mark.parametrize("registry, name", COMPONENTS, ids=IDS)
def test_every_component_has_option_records_whose_defaults_build_it(registry, name):
    options = registry.options(name)
    assert all(isinstance(opt, Option) for opt in options.values())
    for key, opt in options.items():
        assert opt.check(opt.default) is None, f"{name}.{key}: its default fails its check"
        if opt.traced:  # HParams holds float32 scalars
            assert opt.default is None or isinstance(opt.default, int | float)
            assert not isinstance(opt.default, bool)
    _build(registry, name)  # every default filled in by the records
    if not registry.is_open(name):  # an open one hands further options on (to its base)
        with pytest.raises(ConfigError, match="unknown option"):
            _build(registry, name, no_such_option=1)


@pytest.mark.parametrize("name", RULES.names())
def test_every_rule_declares_a_geometry(name):
    geometry = RULES.meta(name)["geometry"]
    assert isinstance(geometry, Geometry) and RULES.geometry(name) is geometry
    assert geometry.reference in REFERENCES and geometry.constraint in CONSTRAINTS
    options = RULES.options(name)
    if "f" in options:
        assert geometry.f_option == "f"
    named = (geometry.f_option, geometry.radius_option, geometry.trim_option)
    assert all(k is None or k in options for k in (*named, geometry.select_option))
    if geometry.radius_option is not None:
        assert geometry.constraint == "ball" and options[geometry.radius_option].traced


def test_an_unregistered_name_has_the_means_geometry():
    assert RULES.geometry("phocas") == RULES.geometry("mean") == Geometry("mean", "ball")


# --------------------------------------------------------------------------- the config's split


def _split_cases():
    for name in RULES.names():
        for key, opt in RULES.options(name).items():
            yield "rule", name, key, opt
    for name in PRE.names():
        for key, opt in PRE.options(name).items():
            yield "stage", name, key, opt
    for name in ATTACKS.names():
        for key, opt in ATTACKS.options(name).items():
            yield "attack", name, key, opt


SPLIT = list(_split_cases())


@pytest.mark.parametrize(
    "kind, name, key, opt", SPLIT, ids=[f"{k}:{n}.{o}" for k, n, o, _ in SPLIT]
)
def test_the_config_splits_each_option_as_its_record_says(kind, name, key, opt):
    """Traced options go to HParams, the others to the Spec: an option declared traced
    that the config kept static would recompile every sweep point (issue 10's clip_norm);
    one the config traced but the component reads as static would be ignored."""
    value = _sample(opt) if opt.traced else opt.default
    if kind == "attack":
        static, traced = _split_traced(ATTACKS, name, {key: value})
        assert (key in traced, key in static) == (opt.traced, not opt.traced)
        return
    if kind == "rule":
        static, traced = _split_aggregator(name, {key: value})
        assert (key in traced, key in static) == (opt.traced, not opt.traced)
        return
    # a stage named by a string takes top-level options; a mapping stage its own
    static, traced = _split_aggregator("median", {"pre": [name], key: value})
    assert (key in traced, key in static) == (opt.traced, not opt.traced)
    static, traced = _split_aggregator("median", {"pre": [{"name": name, key: value}]})
    assert (key in traced, key in static["pre"][0]) == (opt.traced, not opt.traced)


def _traced_cases():
    """(override, HParams section, option, value) for each traced option."""
    for name in RULES.names():
        for key in RULES.traced(name):
            value = _sample(RULES.options(name)[key])
            over = f"aggregator={{name: {name}, {key}: {value}}}"
            if name in PEER_ONLY:  # a node of a graph (every node takes part)
                over = f"{over}\ntopology={{name: ring}}\nclient.participants=12"
            yield over, "agg", key, value
    for name in PRE.names():
        for key in PRE.traced(name):
            value = _sample(PRE.options(name)[key])
            over = f"aggregator={{name: mean, pre: [{{name: {name}, {key}: {value}}}]}}"
            yield over, "agg", key, value
    for name in ATTACKS.names():
        for key in ATTACKS.traced(name):
            value = _sample(ATTACKS.options(name)[key])
            over = f"attack={{name: {name}, {key}: {value}}}"
            if name in PEER_ATTACKS:
                over = f"{over}\ntopology={{name: ring}}\nclient.participants=12"
            yield over, "attack", key, value


TRACED = list(_traced_cases())


@pytest.mark.parametrize("override, section, key, value", TRACED, ids=[t[0] for t in TRACED])
def test_every_traced_option_reaches_hparams_through_a_config(override, section, key, value):
    """End to end (validation included): each traced option given in a config lands in
    HParams with its value and nowhere in the Spec."""
    spec, hp = to_spec(load_config(None, [*SMALL, "judge.size=10", *override.split("\n")]))
    assert float(getattr(hp, section)[key]) == pytest.approx(float(value))
    assert key not in str(spec.aggregator_kw) + str(spec.attack_kw)


@pytest.mark.parametrize("rule, attack", [("trimmed_mean", "alie"), ("norm_bound", "fang")])
def test_memory_plans_with_the_records_traced_options(rule, attack):
    spec = SimpleNamespace(aggregator=rule, attack=attack)
    hp = memory._hparams_shapes(SimpleNamespace(spec=spec))
    assert set(hp.agg) == set(RULES.traced(rule)) and set(hp.attack) == set(ATTACKS.traced(attack))


# --------------------------------------------------------------------------- geometry


@pytest.fixture
def registered():
    """Register rules for one test, and take them out again."""
    names = []

    def register(name, geometry, options):
        @RULES.register(name, options=options, geometry=geometry)
        def make(**kw):
            return aggregators.make("mean")

        names.append(name)

    yield register
    for name in names:
        del RULES._factories[name], RULES._meta[name]


def _region(rule, rule_kw=(), rule_hparams=None):
    n, d = 8, 5
    rows = jnp.asarray(np.random.default_rng(0).normal(size=(n, d)), jnp.float32)
    ctx = AttackContext(
        global_params=jnp.zeros(d),
        key=jax.random.PRNGKey(0),
        hparams={},
        weights=jnp.ones(n),
        previous_aggregate=jnp.full(d, 0.5),
        rule_hparams=rule_hparams or {},
    )
    mask = jnp.arange(n) >= 2
    setup = AttackSetup(rule=rule, rule_kw=tuple(rule_kw))
    return rule_region(setup, rows, mask, jnp.float32(2), ~mask, ctx, jnp.float32(1.0))


def test_a_rule_registered_later_gets_its_region_from_its_geometry(registered):
    registered(
        "later_clip",
        Geometry("previous_aggregate", "ball", radius_option="r"),
        {"r": Option(2.0, traced=True)},
    )
    registered("later_median", Geometry("median", "box"), {})
    registered("later_krum", Geometry("mean", "score", f_option="f"), {"f": Option(0)})
    ball = _region("later_clip", rule_hparams={"r": jnp.float32(0.25)})
    assert ball.kind == "ball" and float(ball.radius) == 0.25
    np.testing.assert_array_equal(ball.center, np.full(5, 0.5, np.float32))
    assert float(_region("later_clip").radius) == 2.0  # the record's default
    np.testing.assert_array_equal(_region("later_median").lo, _region("median").lo)
    assert _region("later_krum", [("f", 1)]).kind == "search"
    fang = attacks.make("fang", setup=AttackSetup(rule="later_krum", rule_kw=(("f", 1),)))
    same = attacks.make("fang", setup=AttackSetup(rule="krum", rule_kw=(("f", 1),)))
    assert fang.craft.__name__ == same.craft.__name__ == "craft_krum"


def test_a_geometry_must_name_declared_options():
    with pytest.raises(ValueError, match="unknown option"):
        RULES.register(
            "bad_rule", options={}, geometry=Geometry("origin", "ball", radius_option="r")
        )
    with pytest.raises(ValueError, match="unknown reference or constraint"):
        RULES.register("bad_rule", options={}, geometry=Geometry("origin", "sphere"))
    with pytest.raises(ValueError, match="Option\\(traced=True\\)"):
        PRE.register("bad_stage", options={}, traced=("x",))
    assert "bad_rule" not in RULES and "bad_stage" not in PRE


# --------------------------------------------------------------------------- layers

PACKAGE = Path(__file__).resolve().parents[1] / "fedsim"


@pytest.mark.parametrize(
    "package", sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
)
def test_no_module_imports_from_its_own_packages_init(package):
    own = re.compile(rf"^\s*from fedsim\.{package} import (.*)$", re.M)
    for path in (PACKAGE / package).glob("*.py"):
        if path.name == "__init__.py":
            continue
        for names in own.findall(path.read_text()):
            submodules = {p.stem for p in (PACKAGE / package).glob("*.py")}
            imported = {n.strip(" ()").split(" as ")[0] for n in names.split(",")}
            assert imported <= submodules, f"{path.name} imports {names} from {package}/__init__"


def test_no_module_imports_a_private_module_of_another_package():
    private = re.compile(r"^\s*(?:from|import) fedsim\.(\w+)\.(_\w+)", re.M)
    for path in PACKAGE.rglob("*.py"):
        for package, module in private.findall(path.read_text()):
            assert path.parent.name == package, f"{path} imports fedsim.{package}.{module}"

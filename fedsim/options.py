"""Component options: one record type for rules, pre-aggregation stages and attacks.

A component declares its options once, where it is registered::

    @REGISTRY.register(
        "zeno",
        options={"b": Option(0, at_least(0)), "rho": Option(5e-4, traced=True)},
        geometry=Geometry("none", "behaviour", f_option="b"),
    )
    def make_zeno(b: int, rho: float) -> Aggregator: ...

Each ``Option`` holds the default, a check (a value -> an error text or ``None``) and
whether the option is *traced*: a number a sweep varies, which the config puts in
``HParams`` and the component reads from ``ctx.hparams`` at run time (falling back to the
value it was built with), so a new value is no new compile. Every other option is static:
it goes to the ``Spec`` and fixes shapes or code paths. ``Components.make`` (and calling
the registered factory) fills in the defaults, refuses unknown options and runs the
checks, with one-line ``ConfigError``s; ``fedsim.config`` reads the same records to split
a config into ``Spec`` and ``HParams``.

Checks that tie several options together, or that need the input's shape (Krum's
``n > 2f + 2``), stay in the factory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from fedsim.registry import ConfigError, Registry

Check = Callable[[Any], "str | None"]


def anything(v) -> None:
    return None


class Option(NamedTuple):
    """One option: its default, a check returning an error text or ``None``, and whether
    it is traced (module docstring)."""

    default: Any
    check: Check = anything
    traced: bool = False


# --------------------------------------------------------------------------- checks


def number(lo: float | None = None, hi: float | None = None, *, allow_none: bool = False):
    """Check for a real number in ``[lo, hi]`` (``None`` allowed if ``allow_none``)."""

    def check(v):
        if v is None and allow_none:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number, got {v!r}"
        if lo is not None and v < lo:
            return f"must be >= {lo}, got {v!r}"
        if hi is not None and v > hi:
            return f"must be <= {hi}, got {v!r}"
        return None

    return check


def integer(lo: int = 0, *, allow_none: bool = False):
    """Check for a Python integer ``>= lo`` (``None`` allowed if ``allow_none``)."""

    def check(v):
        if v is None and allow_none:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            return f"must be an integer >= {lo}, got {v!r}"
        return None

    return check


def choice(*allowed):
    def check(v):
        return None if v in allowed else f"must be one of {', '.join(map(str, allowed))}, got {v!r}"

    return check


def boolean(v):
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def holds(test: Callable[[Any], bool], text: str, *, allow_none: bool = False) -> Check:
    """Check that ``test(v)`` holds, else ``"<text>, got <v>"``. Unlike ``number`` it takes
    any value ``test`` can compare (numpy and JAX scalars too), as the rules always have;
    a value it cannot compare fails the check."""

    def check(v):
        if v is None and allow_none:
            return None
        try:
            ok = bool(test(v))
        except TypeError:
            ok = False
        return None if ok else f"{text}, got {v}"

    return check


def at_least(lo, **kw) -> Check:
    return holds(lambda v: v >= lo, f"must be >= {lo}", **kw)


# --------------------------------------------------------------------------- registry


class Components(Registry):
    """A registry whose components declare their options as ``Option`` records.

    ``register(name, options={...}, open=False, **meta)``: ``options`` maps each option to
    its record; ``open`` lets the factory take further options it hands on (a rule that
    wraps another rule takes that rule's options). The registered callable is the factory
    wrapped so that it receives every option, defaults filled in and checked, plus the
    ``context`` keywords the registry passes through unchecked (an attack's ``setup``).
    ``meta`` is free-form, as in ``Registry`` (a rule's ``geometry``).

    Error texts: ``"<label>: <option label> <problem>"``, with ``label`` and
    ``option_label`` format strings of ``name`` and ``option``.
    """

    def __init__(
        self,
        kind: str,
        *,
        label: str = "{name}",
        option_label: str = "{option}",
        context: Mapping[str, Callable[[], Any]] | None = None,
    ):
        super().__init__(kind)
        self.label = label
        self.option_label = option_label
        self.context = dict(context or {})

    def register(self, name: str, *, options: Mapping[str, Option], open: bool = False, **meta):
        if "traced" in meta:
            raise ValueError(
                f"{self.kind} {name!r}: declare traced options with Option(traced=True)"
            )
        options = dict(options)
        for key, opt in options.items():
            if not isinstance(opt, Option):
                raise TypeError(f"{self.kind} {name!r}: option {key!r} is not an Option")
        outer = super().register(name, options=options, open=open, **meta)

        def decorator(factory: Callable) -> Callable:
            def build(**kw):
                given = {k: kw.pop(k, None) for k in self.context}
                fixed = {k: v if v is not None else self.context[k]() for k, v in given.items()}
                return factory(**fixed, **self.fill(name, kw))

            build.__name__, build.__qualname__ = factory.__name__, factory.__qualname__
            build.__doc__, build.__module__ = factory.__doc__, factory.__module__
            return outer(build)

        return decorator

    def options(self, name: str) -> dict[str, Option]:
        """The option records of ``name``, in declaration order."""
        return self.meta(name)["options"]

    def traced(self, name: str) -> tuple[str, ...]:
        """The names of ``name``'s traced options."""
        return tuple(k for k, opt in self.options(name).items() if opt.traced)

    def is_open(self, name: str) -> bool:
        return self.meta(name)["open"]

    def accepts(self, name: str, option: str) -> bool:
        """Whether ``name`` takes ``option`` (an open component takes any)."""
        return option in self.options(name) or self.is_open(name)

    def fill(self, name: str, kw: Mapping[str, Any]) -> dict:
        """``kw`` checked against ``name``'s records, with the defaults of the options it
        leaves out; further options pass unchecked only if ``name`` is open."""
        options = self.options(name)
        label = self.label.format(name=name)
        unknown = sorted(set(kw) - set(options))
        if unknown and not self.is_open(name):
            raise ConfigError(
                f"{label}: unknown option(s) {', '.join(unknown)}; "
                f"valid options: {', '.join(sorted(options)) or 'none'}"
            )
        out = {}
        for key, opt in options.items():
            value = kw.get(key, opt.default)
            problem = opt.check(value)
            if problem:
                where = self.option_label.format(option=key)
                raise ConfigError(f"{label}: {where} {problem}")
            out[key] = value
        return {**out, **{k: kw[k] for k in unknown}}

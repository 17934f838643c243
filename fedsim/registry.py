"""Name -> factory registries, so configs can name every component.

A registry maps a name to a factory. ``make(name, **kw)`` calls it; an unknown name is a
``ConfigError`` that lists the known ones, so a typo in a config is a one-line message.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration mistake; the CLI prints it on one line and exits 2."""


class Registry:
    """A named collection of factories (datasets, models, aggregators, attacks, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Callable], Callable]:
        """Decorator: ``@REG.register("heart", source=...)``. ``meta`` is free-form (rules,
        stages and attacks register through ``fedsim.options.Components``, with option
        records)."""

        def decorator(factory: Callable) -> Callable:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            self._meta[name] = meta
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._factories:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            )
        return self._factories[name]

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def make(self, name: str, **kw: Any) -> Any:
        return self.get(name)(**kw)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        return name in self._factories

    def __iter__(self):
        return iter(self.names())


def accepted(factory, **fixed) -> dict:
    """The subset of ``fixed`` keyword arguments that ``factory`` accepts."""
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fixed
    return {k: v for k, v in fixed.items() if k in params}

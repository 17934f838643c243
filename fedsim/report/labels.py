"""Short readable labels of swept values (``label_of``) and the order of an axis' values."""

from __future__ import annotations

import json
import re

GREEK = {
    "alpha": "α",
    "beta": "β",
    "gamma": "γ",
    "delta": "δ",
    "epsilon": "ε",
    "lambda": "λ",
    "mu": "μ",
    "nu": "ν",
    "rho": "ρ",
    "sigma": "σ",
    "tau": "τ",
    "kappa": "κ",
}


class _Missing:
    """A key a run's swept point does not have (e.g. ``attack.beta`` of ``{name: none}``)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


def _scalar_label(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _list_label(values) -> str:
    """``[0, 2, 3, 4, 5, 6, 8, 9]`` -> ``[0,2–6,8,9]``: runs of 3+ integers collapse."""
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "[" + ",".join(label_of(v) for v in values) + "]"
    parts, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            run = values[start:i]
            parts += [f"{run[0]}–{run[-1]}"] if len(run) >= 3 else [str(v) for v in run]
            start = i
    return "[" + ",".join(parts) + "]"


def _option_rank(key: str) -> tuple:
    """Label order of options: the goal, then source→target, the rest by name, fraction
    last (summary.json stores mappings with sorted keys, so dict order is not the user's)."""
    return ({"goal": 0, "source": 1}.get(key, 3 if key == "fraction" else 2), key)


def _option_parts(options: dict) -> list[str]:
    """A component's options as short label parts (see ``label_of``)."""
    parts = []
    pair = "source" in options and "target" in options
    for key in sorted(options, key=_option_rank):
        value = options[key]
        if value is None or (key == "target" and pair):
            continue
        if key == "source" and pair:
            parts.append(f"{label_of(value)}→{label_of(options['target'])}")
        elif key == "fraction" and isinstance(value, int | float):
            if value:
                parts.append(f"{100 * value:.3g}%")
        elif key == "goal":
            parts.append(_goal_label(value))
        else:
            parts.append(f"{GREEK.get(key, key)}={label_of(value)}")
    return parts


def _goal_label(goal) -> str:
    """An attack's goal: ``{name: targeted, source: 1, target: 7}`` -> ``1→7``."""
    if not isinstance(goal, dict):
        return label_of(goal)
    options = {k: v for k, v in goal.items() if k != "name"}
    parts = _option_parts(options)
    if goal.get("name") in ("targeted", None) and parts:
        return ", ".join(parts)
    return label_of(goal)


def label_of(value) -> str:
    """A swept value as a short readable label.

    Mappings with a ``name`` read as ``name(options)``: ``{name: trimmed_mean, beta: 0.1}``
    -> ``trimmed_mean(β=0.1)``, ``{name: krum, f: 10}`` -> ``krum(f=10)``, an attack
    ``{name: strategic_distance, goal: {name: targeted, source: 1, target: 7}, fraction:
    0.2}`` -> ``strategic_distance(1→7, 20%)``, ``{name: none}`` -> ``none``. Scalars read
    as they are (floats in ``%g``), integer lists compress runs (``[0–9]``)."""
    if value is MISSING:
        return "unset"
    if isinstance(value, dict):
        options = {k: v for k, v in value.items() if k != "name"}
        parts = _option_parts(options)
        if "name" not in value:
            return ", ".join(parts)
        return f"{value['name']}({', '.join(parts)})" if parts else str(value["name"])
    if isinstance(value, list | tuple):
        return _list_label(list(value))
    return _scalar_label(value)


def knob_label(key: str, value) -> str:
    """A knob's value named by the last part of its key: ``aggregator.beta`` -> ``β=0.1``."""
    name = key.rsplit(".", 1)[-1]
    return f"{GREEK.get(name, name)}={label_of(value)}"


def natural_key(text: str) -> tuple:
    """Sort key that orders numbers inside labels by value (``f=5`` before ``f=10``)."""
    parts = re.split(r"(\d+(?:\.\d+)?)", text)
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts))


def order_key(value) -> tuple:
    """Axis order: ``none`` first, numbers by value, the rest by natural label order."""
    if value is MISSING:
        return (3, 0.0, ())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (1, float(value), ())
    label = label_of(value)
    return (0, 0.0, ()) if label == "none" else (2, 0.0, natural_key(label))


def ident(value) -> str:
    """A hashable identity for a swept value (mappings and lists are not hashable)."""
    return "<missing>" if value is MISSING else json.dumps(value, sort_keys=True, default=str)

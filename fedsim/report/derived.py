"""Metrics the report derives from several runs or from a run's swept point, without
plotting: the collaboration gain against local-only runs of the same sweep, and the
attackers' share of each round under client sampling."""

from __future__ import annotations

import dataclasses
import re
import statistics

from fedsim.report.data import Record, is_number, value_at
from fedsim.report.labels import MISSING, ident

# who aggregates whose updates: left out when matching a run with its local-only baseline
BASELINE_IGNORES = ("topology", "aggregator")
ACCURACY = re.compile(r"^(group\d+_)?test_accuracy$")


def is_alone(record: Record) -> bool:
    """Whether the run trained every node alone (a swept ``topology: {name: isolated}``)."""
    topology = value_at(record.point, "topology")
    return isinstance(topology, dict) and topology.get("name") == "isolated"


def _match_key(record: Record, ignore: tuple[str, ...]) -> str:
    """The run's swept point and seed without the keys of ``ignore`` (nor keys under them)."""
    kept = {
        k: v
        for k, v in record.point.items()
        if not any(k == i or k.startswith(i + ".") for i in ignore)
    }
    return ident({"point": kept, "seed": record.seed})


def _gains(record: dict, base: dict) -> dict:
    """``collaboration_gain`` and ``group<g>_collaboration_gain`` of one evaluation (or one
    run's final metrics, keys prefixed ``final_``): this run's accuracy minus the
    baseline's, for every (group) test accuracy both have."""
    out = {}
    for key, value in record.items():
        name = key.removeprefix("final_")
        if ACCURACY.match(name) and is_number(value) and is_number(base.get(key)):
            gain = name.replace("test_accuracy", "collaboration_gain")
            out[key[: len(key) - len(name)] + gain] = value - base[key]
    return out


def _with_gains(record: Record, base: Record) -> Record:
    by_round = {rec.get("round"): rec for rec in base.history}
    history = [{**rec, **_gains(rec, by_round.get(rec.get("round"), {}))} for rec in record.history]
    metrics = {**record.metrics, **_gains(record.metrics, base.metrics)}
    return dataclasses.replace(record, metrics=metrics, history=history)


def with_collaboration_gain(
    records: list[Record], ignore: tuple[str, ...] = BASELINE_IGNORES
) -> list[Record]:
    """``records`` where the sweep holds local-only runs (``topology: isolated``): every
    other run gains ``collaboration_gain`` and ``group<g>_collaboration_gain`` (final
    metrics and per evaluation): its (group's) test accuracy minus that of the local-only
    run with the same seed and the same swept values apart from ``ignore`` (the same
    attack, so the same honest nodes are averaged). Runs without such a baseline, and
    sweeps without local-only runs, are returned unchanged."""
    alone = {_match_key(r, ignore): r for r in records if is_alone(r)}
    if not alone:
        return records
    out = []
    for r in records:
        base = None if is_alone(r) else alone.get(_match_key(r, ignore))
        out.append(r if base is None else _with_gains(r, base))
    return out


def with_malicious_share(records: list[Record], key: str = "client.participants") -> list[Record]:
    """``records`` where ``key`` (participants per round) was swept: every evaluation gains
    ``malicious_share`` (malicious participants / participants, averaged over the rounds
    since the previous evaluation: one round each with ``eval_every: 1``) and the run
    ``mean_malicious_share`` and ``max_malicious_share`` over its evaluations."""
    out = []
    for r in records:
        m = value_at(r.point, key)
        if m is MISSING or not is_number(m) or m <= 0:
            out.append(r)
            continue
        history = [
            {**rec, "malicious_share": rec["malicious_participants"] / m}
            if is_number(rec.get("malicious_participants"))
            else rec
            for rec in r.history
        ]
        shares = [rec["malicious_share"] for rec in history if "malicious_share" in rec]
        metrics = dict(r.metrics)
        if shares:
            metrics["mean_malicious_share"] = statistics.fmean(shares)
            metrics["max_malicious_share"] = max(shares)
        out.append(dataclasses.replace(r, metrics=metrics, history=history))
    return out


def derive(records: list[Record]) -> list[Record]:
    """Every derived metric that applies to ``records`` (see the functions above)."""
    return with_malicious_share(with_collaboration_gain(records))

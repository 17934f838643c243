"""Median seconds per scanned fused round for the fedsim tree on ``PYTHONPATH``.

Run it in two checkouts, alternately, to compare them side by side on one machine
(``bench/results/before_after_redesign.json``): it uses whichever API the tree has
(``fedsim.round`` since the redesign, ``fedsim.engine`` before). 1,000 clients all
participating, MNIST MLP, batch 32, one local step, 5 scanned rounds per call, median of
5 calls, for FedAvg, the trimmed mean under ALIE, and the median.

Usage: ``PYTHONPATH=<tree> python bench/compare_round.py [--clients N]``
"""

from __future__ import annotations

import argparse
import json

import jax
import timing  # bench/ is on sys.path when run as a script

from fedsim.config import load_config, to_spec

try:
    from fedsim.round import make_init, make_round
    from fedsim.setup import prepare
except ImportError:  # the tree before the redesign
    from fedsim.engine import make_init, make_round, prepare

ROUNDS, REPEATS = 5, 5
CASES = (("mean", "none"), ("trimmed_mean", "alie"), ("median", "none"))


def make_setup(rule: str, attack: str, clients: int):
    overrides = [
        f"data.n_clients={clients}",
        f"client.participants={clients}",
        "data.partition.name=iid",
        "model.widths=[100]",
        "client.local_steps=1",
        "client.local_epochs=null",
        "client.batch_size=32",
        "client.lr=0.1",
        f"aggregator.name={rule}",
        f"attack.name={attack}",
    ]
    if attack != "none":
        overrides.append("attack.fraction=0.1")
    spec, hparams = to_spec(load_config(None, overrides))
    return prepare(spec), hparams


def seconds_per_round(setup, hparams) -> float:
    state = jax.jit(make_init(setup))(jax.random.PRNGKey(0), hparams)
    step = make_round(setup)
    return timing.seconds_per_round(step, state, hparams, setup.data, ROUNDS, REPEATS)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    args = parser.parse_args(argv)
    out = {
        f"{rule}+{attack}": seconds_per_round(*make_setup(rule, attack, args.clients))
        for rule, attack in CASES
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Small `digits` federations shared by the tests: ``SMALL_DIGITS`` (12 clients, 5 per
round, a few rounds; config, set-up and runner tests) and ``DIGITS_FEDERATION`` with
``run_digits`` (20 clients, all participating, 20% malicious; the attack tests that run
the engine end to end)."""

from fedsim import runner
from fedsim.config import load_config, to_spec
from fedsim.setup import prepare

SMALL_DIGITS = [
    "data.name=digits",
    "data.n_clients=12",
    "client.participants=5",
    "model.widths=[16]",
    "client.batch_size=16",
    "rounds=4",
    "eval_every=2",
]

DIGITS_FEDERATION = [
    "data.name=digits",
    "data.n_clients=20",
    "client.participants=20",
    "model.widths=[32]",
    "client.batch_size=16",
    "attack.fraction=0.2",
]


def run_digits(*overrides: str, seed: int = 0) -> list[dict]:
    """History of one run of ``DIGITS_FEDERATION`` plus ``overrides`` (later ones win)."""
    spec, hparams = to_spec(load_config(None, [*DIGITS_FEDERATION, *overrides]))
    return runner.run(prepare(spec), hparams, seed=seed)

"""Whole-engine runs on the small `digits` dataset, shared by the attack tests that run
the engine end to end: 20 clients, all participating, 20% of them malicious."""

from fedsim import runner
from fedsim.config import load_config, to_spec
from fedsim.setup import prepare

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

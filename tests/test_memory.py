"""Memory planning: the estimate bounds XLA's own figure, the plan chunks clients and
sizes run batches to a budget, refuses in one line when nothing fits, and client
chunking (lax.map) leaves results unchanged."""

import jax
import numpy as np
import pytest

from fedsim import memory
from fedsim.cli import main
from fedsim.config import load_config, to_spec
from fedsim.kernels import PASS_ENTRIES
from fedsim.layout import with_layout
from fedsim.registry import ConfigError
from fedsim.round import column_layout, make_chunk, make_init
from fedsim.setup import prepare

OVER = [
    "client.participants=12",
    "rounds=2",
    "eval_every=2",
    "aggregator.name=median",
    "attack.name=alie",
    "attack.fraction=0.25",
]


@pytest.fixture(scope="module")
def setup():
    spec, hp = to_spec(load_config("configs/digits.yaml", OVER))
    return prepare(spec), hp


@pytest.mark.slow
def test_chunked_clients_match_one_vmap_and_estimate_bounds_xla(setup):
    setup, hp = setup
    fp = memory.footprint(setup)
    results = {}
    for chunk in (None, 5):  # 5 does not divide 12: lax.map handles the remainder
        s = with_layout(setup, client_chunk=chunk)
        state = jax.jit(make_init(s))(jax.random.PRNGKey(1), hp)
        compiled = jax.jit(make_chunk(s, 2)).lower(state, hp, s.data).compile()
        ma = compiled.memory_analysis()
        xla = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
        assert memory.estimate(fp, 1, chunk) >= xla
        new_state, metrics = compiled(state, hp, s.data)
        results[chunk] = (jax.flatten_util.ravel_pytree(new_state.params)[0], metrics)
    np.testing.assert_allclose(results[None][0], results[5][0], rtol=1e-5, atol=1e-6)
    for k in ("test_accuracy", "test_loss", "malicious_weight"):
        np.testing.assert_allclose(results[None][1][k], results[5][1][k], rtol=1e-5)


def test_plan_fits_the_budget(setup):
    setup, _ = setup
    fp = memory.footprint(setup)
    roomy = memory.plan(setup, 16, 10**12)
    assert roomy.batch == 16 and roomy.client_chunk is None
    # Room for one run only if clients train a few at a time.
    tight = memory.estimate(fp, 1, 3) + 1
    p = memory.plan(setup, 16, tight)
    assert p.batch == 1 and p.client_chunk is not None and p.client_chunk <= 3
    assert p.estimate_bytes <= tight
    # Room for about 5 runs training all clients at once.
    five = fp.data + 5 * (memory.estimate(fp, 1, None) - fp.data)
    assert memory.plan(setup, 16, five) == memory.Plan(5, None, five, five)
    assert memory.plan(setup, 16, five, max_batch=2).batch == 2


def test_refuses_in_one_line_with_the_largest_setting_that_fits(setup):
    setup, _ = setup
    fp = memory.footprint(setup)
    budget = memory.estimate(fp, 1, 1, participants=7)
    with pytest.raises(ConfigError) as err:
        memory.plan(setup, 1, budget)
    msg = str(err.value)
    assert "\n" not in msg and "largest that fits: client.participants=7" in msg
    assert f"budget is {memory._size(budget)} (--memory-gb)" in msg


def test_cli_memory_errors_exit_2(tmp_path, capsys):
    args = ["run", "configs/digits.yaml", "--out", str(tmp_path / "r"), "--quiet"]
    assert main([*args, "--memory-gb", "0.00001"]) == 2
    err = capsys.readouterr().err
    assert "largest that fits" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()  # refused before writing anything
    assert main([*args, "--memory-gb", "-1"]) == 2
    assert main([*args, "--devices", "64"]) == 2


def test_budget_defaults_to_a_fraction_of_memory():
    assert memory.budget_bytes(2.0) == 2 * memory.GB
    assert 0 < memory.budget_bytes() <= memory.device_memory_bytes()


def _xla_bytes(setup, hp) -> int:
    """XLA's own figure for a compiled chunk of two rounds: arguments, outputs, temporaries."""
    state = jax.jit(make_init(setup))(jax.random.PRNGKey(1), hp)
    ma = jax.jit(make_chunk(setup, 2)).lower(state, hp, setup.data).compile().memory_analysis()
    return ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes


def test_peer_to_peer_estimate_counts_neighbourhoods_and_bounds_xla():
    """Peer-to-peer the estimate holds each node's K gathered rows (K = 5 on a 4 x 4
    torus, every node on a complete graph), chunked nodes hold fewer at once, the plan
    picks a node chunk when all 16 neighbourhoods do not fit, and the estimate stays
    above XLA's own figure for the chunked round."""
    over = ["data.n_clients=16", "client.participants=16", *OVER[1:]]
    torus, hp = to_spec(load_config("configs/digits.yaml", [*over, "topology.name=torus"]))
    setup = prepare(torus)
    fp = memory.footprint(setup)
    assert fp.neighbourhood == 5
    complete = to_spec(load_config("configs/digits.yaml", [*over, "topology.name=complete"]))
    assert memory.footprint(prepare(complete[0])).neighbourhood == 16
    assert memory.estimate(fp, 1, 4) < memory.estimate(fp, 1, None)
    tight = memory.estimate(fp, 1, 4) + 1
    chosen = memory.plan(setup, 1, tight)
    assert chosen.client_chunk is not None and chosen.client_chunk <= 4
    assert memory.estimate(fp, 1, 4) >= _xla_bytes(with_layout(setup, client_chunk=4), hp)


def test_by_column_blocks_estimate_holds_a_block_and_bounds_xla():
    """A columnwise rule without crafted messages runs by column blocks: the estimate
    holds every node's [K, block] rows (not [K, d]: less when the block is narrower than
    the model) and stays above XLA's own figure."""
    over = ["data.n_clients=16", "client.participants=16", *OVER[1:3], "aggregator.name=median"]
    spec, hp = to_spec(load_config("configs/digits.yaml", [*over, "topology.name=torus"]))
    setup = prepare(spec)
    fp = memory.footprint(setup)
    assert fp.neighbourhood == 5 and fp.column_block == column_layout(16, 5, "median")[0]
    gathered = memory.estimate(fp._replace(column_block=None), 1, None)
    assert memory.estimate(fp._replace(column_block=fp.d // 8), 1, None) < gathered
    assert memory.estimate(fp, 1, None) >= _xla_bytes(setup, hp)


def _wide_digits(aggregator: str, *extra: str):
    """Digits with a 512-wide hidden layer and 64 clients: the [m, d] update matrices
    (10 MB each) dwarf everything else the program holds."""
    over = ["data.n_clients=64", "client.participants=64", "model.widths=[512]", *OVER[1:3]]
    over += [f"aggregator.name={aggregator}", *extra]
    spec, hp = to_spec(load_config("configs/digits.yaml", over))
    return prepare(spec), hp


def test_chunked_training_holds_one_update_matrix_and_the_mean_no_working_set():
    """Clients trained in chunks write their ravelled rows straight into the one [m, d]
    matrix (XLA's figure drops by more than half a matrix against training all at once),
    the estimate counts one matrix for it, and the mean (``matrix_free``) adds no working
    set beyond a masked column block: its estimate is AGG_COPIES matrices and the m x m
    term below the median's, and still above XLA's own figure."""
    mean, hp = _wide_digits("mean")
    median, _ = _wide_digits("median")
    fp, fp_median = memory.footprint(mean), memory.footprint(median)
    assert fp.matrix_free and not fp_median.matrix_free
    assert not memory.footprint(_wide_digits("mean", "aggregator.pre=[{name: nnm}]")[0]).matrix_free
    matrix = 4 * 64 * fp.d
    whole = _xla_bytes(median, hp)
    chunked = _xla_bytes(with_layout(median, client_chunk=8), hp)
    assert chunked <= whole - matrix // 2
    assert memory.estimate(fp_median, 1, 8) >= chunked
    mean_xla = _xla_bytes(with_layout(mean, client_chunk=8), hp)
    assert memory.estimate(fp, 1, 8) >= mean_xla
    saved = memory.estimate(fp_median, 1, 8) - memory.estimate(fp, 1, 8)
    block = 4 * min(64 * fp.d, 2 * PASS_ENTRIES)
    assert saved == matrix * memory.AGG_COPIES + 4 * 64 * 64 - block


def test_fedavg_on_100000_clients_of_the_mnist_mlp_fits_the_h100_budget():
    """The GPU figures' largest round (bench/gpu.py: 100,000 clients, MLP 784-100-10,
    d = 79,510): with the mean it fits the H100's budget (47.5 GiB, as
    bench/results/gpu_largest.json recorded it) by training clients in chunks; a rule
    with the default working set (two more [m, d] matrices and an m x m one) does not
    fit at any chunk."""
    setup, _ = _wide_digits("mean")
    d, m = 79_510, 100_000
    per_client = 4 * d * 4 + 4 * 3 * 32 * (784 + 100 + 10)
    fp = memory.footprint(setup)._replace(d=d, participants=m, per_client_train=per_client)
    budget = int(47.5078125 * memory.GB)
    assert memory.estimate(fp, 1, m // 16) <= budget
    other = fp._replace(matrix_free=False)
    assert all(memory.estimate(other, 1, c) > budget for c in memory._chunks(m))

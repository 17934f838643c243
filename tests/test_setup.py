"""Set-up: whose data is whose (the judge's, the adversary's proxy, the clients')."""

import numpy as np
from digits_runs import SMALL_DIGITS

from fedsim.config import load_config, to_spec
from fedsim.data import load
from fedsim.setup import carve_held_out, prepare

BASE = SMALL_DIGITS


def test_judge_proxy_and_clients_are_disjoint():
    spec, _ = to_spec(load_config(None, [*BASE, "judge.size=30", "judge.classes=[0, 2, 3]"]))
    labels = np.asarray(load(spec.dataset).y_train)
    judge, proxy, clients = carve_held_out(labels, spec)
    setup = prepare(spec)
    idx, count = np.asarray(setup.data.idx), np.asarray(setup.data.count)
    held_by_clients = np.concatenate([idx[i, : count[i]] for i in range(len(count))])
    assert len(set(judge) & set(proxy)) == 0
    assert len(set(judge) & set(held_by_clients)) == 0
    assert len(set(proxy) & set(held_by_clients)) == 0
    assert set(held_by_clients) <= set(clients)
    # the default proxy stands for the judge's data: same size and classes, other samples
    assert len(proxy) == len(judge) == 30
    assert set(labels[proxy]) <= {0, 2, 3} and set(labels[judge]) <= {0, 2, 3}
    np.testing.assert_array_equal(np.asarray(setup.data.judge_y), labels[judge])
    np.testing.assert_array_equal(np.asarray(setup.data.proxy_y), labels[proxy])
    # an omniscient adversary's proxy is the judge's set itself, only when asked for
    spec, _ = to_spec(load_config(None, [*BASE, "judge.size=30", "proxy.source=judge"]))
    judge, proxy, _ = carve_held_out(labels, spec)
    np.testing.assert_array_equal(judge, proxy)

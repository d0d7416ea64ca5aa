"""The contract every registered strategy keeps, checked strategy by strategy."""

import numpy as np
import pytest

from prifed.core.engine import RoundEngine
from prifed.core.params import is_float
from prifed.strategies import STRATEGIES, build_strategy
from prifed.strategies.base import state_from_bytes, state_to_bytes
from prifed.training.models import get_params, trainable_names
from prifed.transport.inprocess import InProcessTransport

from strategy_cases import (AVERAGING, BUFFERS, GLOBAL, SERVER_OPTIMISERS,
                             TRAINABLE, reply_for, shifted, tiny_sites)

NAMES = sorted(STRATEGIES)
SITES = ["a", "b", "c"]


def aggregate(strategy, params, updates, server_round=1, initialize=True):
    """Run one aggregation of (params, num_samples) updates through the interface."""
    if initialize:
        strategy.initialize(params, TRAINABLE)
    rng = np.random.default_rng(0)
    instructions = strategy.configure_train(server_round, params,
                                            SITES[:len(updates)], rng)
    replies = [reply_for(i, update, n)
               for i, (update, n) in zip(instructions, updates, strict=True)]
    for reply in replies:
        strategy.check_reply(reply, params)
    return strategy.aggregate_train(server_round, params, replies)


def test_every_strategy_is_classified():
    assert set(STRATEGIES) == AVERAGING | SERVER_OPTIMISERS


@pytest.mark.parametrize("name", NAMES)
def test_identical_updates_give_that_update(name):
    update = shifted(GLOBAL, 0.25, counter=9)
    result = aggregate(build_strategy(name), GLOBAL,
                       [(update, 10), (update, 30), (update, 7)])
    single = aggregate(build_strategy(name), GLOBAL, [(update, 1)])
    for tensor in BUFFERS:
        np.testing.assert_allclose(result[tensor], update[tensor], rtol=1e-6)
    for tensor in GLOBAL:
        np.testing.assert_allclose(result[tensor], single[tensor], rtol=1e-6)
    for tensor in TRAINABLE:
        if name in AVERAGING:
            np.testing.assert_allclose(result[tensor], update[tensor], rtol=1e-6)
        else:
            # A server optimiser moves each value towards the update.
            moved = result[tensor] - GLOBAL[tensor]
            assert (np.sign(moved) == np.sign(update[tensor] - GLOBAL[tensor])).all()


@pytest.mark.parametrize("name", NAMES)
def test_weights_follow_sample_counts(name):
    first = shifted(GLOBAL, 1.0, counter=10)
    second = shifted(GLOBAL, -0.2, counter=21)
    result = aggregate(build_strategy(name), GLOBAL, [(first, 10), (second, 30)])
    # By hand: (10 * first + 30 * second) / 40, so the offset is
    # (10 * 1.0 - 30 * 0.2) / 40 = 0.1 and the counter (100 + 630) / 40 = 18.25.
    mean = shifted(GLOBAL, 0.1, counter=18)
    from_mean = aggregate(build_strategy(name), GLOBAL, [(mean, 1)])
    for tensor in GLOBAL:
        np.testing.assert_allclose(result[tensor], from_mean[tensor], rtol=1e-5,
                                   atol=1e-6)
    np.testing.assert_allclose(result["bn.running_mean"], mean["bn.running_mean"],
                               rtol=1e-6)
    if name in AVERAGING:
        np.testing.assert_allclose(result["w"], mean["w"], rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_integer_buffers_keep_dtype(name):
    first = shifted(GLOBAL, 1.0, counter=10)
    second = shifted(GLOBAL, -0.2, counter=21)
    result = aggregate(build_strategy(name), GLOBAL, [(first, 10), (second, 30)])
    for tensor, value in GLOBAL.items():
        assert result[tensor].dtype == value.dtype, tensor
        assert result[tensor].shape == value.shape, tensor
    assert int(result["bn.num_batches_tracked"]) == 18


@pytest.mark.parametrize("name", NAMES)
def test_outputs_finite_after_many_rounds(name):
    sites = tiny_sites()
    model = sites[0].model_factory()
    initial = get_params(model)
    local = {"local_steps": 4, "batch_size": 4, "lr": 0.05, "optimizer": "sgd"}
    engine = RoundEngine(build_strategy(name, local_config=local),
                         InProcessTransport(sites), num_rounds=25, seed=1,
                         evaluate_every=25)
    final = engine.run(initial, trainable_names(model))
    assert all(not record.failures for record in engine.history)
    assert all(not record.rejected for record in engine.history)
    for tensor, value in final.items():
        assert value.dtype == initial[tensor].dtype, tensor
        if is_float(value):
            assert np.isfinite(value).all(), tensor
    mean = "layers.1.running_mean"
    assert not np.allclose(final[mean], initial[mean])
    assert int(final["layers.1.num_batches_tracked"]) > 0
    accuracy = [m["accuracy"] for m in engine.history[-1].eval_metrics.values()]
    assert all(np.isfinite(accuracy))


@pytest.mark.parametrize("name", NAMES)
def test_state_survives_save_and_restore(name):
    strategy = build_strategy(name)
    params = GLOBAL
    offsets = [(0.3, 10, 0.1, 20), (-0.1, 12, 0.4, 5), (0.2, 14, -0.3, 9)]

    def updates(round_index):
        first, counter, second, count = offsets[round_index]
        return [(shifted(params_now, first, counter), 10),
                (shifted(params_now, second, count), 25)]

    params_now = params
    for round_index in range(2):
        params_now = aggregate(strategy, params_now, updates(round_index),
                               round_index + 1, initialize=round_index == 0)
    restored = build_strategy(name)
    state = strategy.state_dict()
    restored.load_state_dict(state_from_bytes(state_to_bytes(state)))
    expected = aggregate(strategy, params_now, updates(2), 3, initialize=False)
    got = aggregate(restored, params_now, updates(2), 3, initialize=False)
    for tensor in GLOBAL:
        np.testing.assert_array_equal(got[tensor], expected[tensor])
    if state:
        # Stateless strategies (FedAvg, FedProx) need no trainable names.
        assert restored.trainable == strategy.trainable

"""FedAdam, FedYogi and FedAdagrad pinned against a hand computation.

Model: one trainable tensor w = [1.0, -2.0] and a buffer bn = [0.5]. Two
rounds whose weighted means are w = [1.5, -2.5] then [1.2, -2.0]; options
server_lr 0.1, beta1 0.9, beta2 0.99, tau 1e-3 (v starts at tau^2 = 1e-6).

Round 1 by hand, first value (delta = 0.5):
    m = 0.1 * 0.5 = 0.05
    FedAdam:    v = 0.99 * 1e-6 + 0.01 * 0.25 = 0.00250099
                w = 1 + 0.1 * 0.05 / (sqrt(0.00250099) + 0.001) = 1.0980202
    FedYogi:    v = 1e-6 - 0.01 * 0.25 * sign(1e-6 - 0.25) = 0.002501
                w = 1 + 0.1 * 0.05 / (0.0500100 + 0.001) = 1.0980200
    FedAdagrad: v = 1e-6 + 0.25 = 0.250001
                w = 1 + 0.1 * 0.05 / (0.5000010 + 0.001) = 1.0099800
Round 2 repeats the steps from the float32 result of round 1.
"""

import numpy as np
import pytest

from prifed.core.messages import TrainReply
from prifed.errors import ConfigError
from prifed.strategies import build_strategy
from prifed.strategies.base import state_from_bytes, state_to_bytes

START = {"w": np.array([1.0, -2.0], np.float32), "bn": np.array([0.5], np.float32)}
MEANS = [np.array([1.5, -2.5], np.float32), np.array([1.2, -2.0], np.float32)]
EXPECTED = {
    "fedadam": [[1.0980202, -2.0980201], [1.2045934, -2.1660810]],
    "fedyogi": [[1.0980200, -2.0980201], [1.2040900, -2.1657586]],
    "fedadagrad": [[1.0099800, -2.0099800], [1.0219231, -2.0187609]],
}
OPTIONS = {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}


def step(strategy, params, mean, bn_values, server_round):
    # Two replies whose weighted mean (weights 1 and 3) is ``mean`` for w.
    low = mean - np.float32(0.3)
    high = ((4 * mean.astype(np.float64) - low) / 3).astype(np.float32)
    replies = [TrainReply("a", server_round, {"w": low, "bn": bn_values[0]}, 1),
               TrainReply("b", server_round, {"w": high, "bn": bn_values[1]}, 3)]
    return strategy.aggregate_train(server_round, params, replies)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_server_optimiser_matches_hand_computation(name):
    strategy = build_strategy(name, **OPTIONS)
    strategy.initialize(START, ["w"])
    params = START
    buffers = [np.array([1.0], np.float32), np.array([3.0], np.float32)]
    for server_round, (mean, expected) in enumerate(zip(MEANS, EXPECTED[name],
                                                        strict=True), start=1):
        params = step(strategy, params, mean, buffers, server_round)
        np.testing.assert_allclose(params["w"], expected, rtol=2e-7, atol=2e-7)
        # The buffer is averaged, not stepped: (1 * 1 + 3 * 3) / 4 = 2.5.
        np.testing.assert_allclose(params["bn"], [2.5])
        assert params["w"].dtype == np.float32


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_server_optimiser_restores_moments(name):
    strategy = build_strategy(name, **OPTIONS)
    strategy.initialize(START, ["w"])
    buffers = [np.array([1.0], np.float32), np.array([3.0], np.float32)]
    params = step(strategy, START, MEANS[0], buffers, 1)
    restored = build_strategy(name, **OPTIONS)
    restored.load_state_dict(state_from_bytes(state_to_bytes(strategy.state_dict())))
    after = step(restored, params, MEANS[1], buffers, 2)
    np.testing.assert_allclose(after["w"], EXPECTED[name][1], rtol=2e-7, atol=2e-7)
    assert restored.steps_taken == 2


def test_server_optimiser_needs_initialize():
    strategy = build_strategy("fedyogi")
    reply = TrainReply("a", 1, {"w": MEANS[0], "bn": START["bn"]}, 1)
    with pytest.raises(ConfigError, match="initialize"):
        strategy.aggregate_train(1, START, [reply])


@pytest.mark.parametrize("option, value", [("server_lr", 0.0), ("beta1", 1.0),
                                           ("beta2", -0.1), ("tau", 0.0)])
def test_server_optimiser_rejects_bad_option(option, value):
    with pytest.raises(ConfigError, match=option):
        build_strategy("fedadam", **{option: value})

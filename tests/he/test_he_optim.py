"""Server optimisers run at the sites, pinned against hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prifed.core.messages import TrainReply
from prifed.errors import ConfigError
from prifed.he.optim import (FedAdagrad, FedAdam, FedAvgStep, FedYogi,
                             build_server_optimizer)

ETA, BETA1, BETA2, TAU = 0.1, 0.9, 0.99, 0.1
UPDATES = (0.5, -0.2)


def scalar_reference(kind: str) -> list[float]:
    """Run Algorithm 2 of Reddi et al. (2021) on one scalar, step by step."""
    x, m, v = 1.0, 0.0, TAU ** 2
    path = []
    for d in UPDATES:
        m = BETA1 * m + (1 - BETA1) * d
        if kind == "fedadagrad":
            v = v + d * d
        elif kind == "fedadam":
            v = BETA2 * v + (1 - BETA2) * d * d
        else:
            v = v - (1 - BETA2) * d * d * math.copysign(1.0, v - d * d)
        x = x + ETA * m / (math.sqrt(v) + TAU)
        path.append(x)
    return path


# First steps by hand, from x = 1, d = 0.5, m = 0.1 * 0.5 = 0.05, v0 = 0.01:
# FedAdam    v = 0.99 * 0.01 + 0.01 * 0.25 = 0.0124, x = 1 + 0.005 / 0.211355
# FedYogi    v = 0.01 + 0.01 * 0.25 (sign -1)  = 0.0125, x = 1 + 0.005 / 0.211803
# FedAdagrad v = 0.01 + 0.25                   = 0.26,   x = 1 + 0.005 / 0.609902
FIRST_STEP = {"fedadam": 1.0236569, "fedyogi": 1.0236068, "fedadagrad": 1.0081980}


@pytest.mark.parametrize("cls", [FedAdam, FedYogi, FedAdagrad])
def test_adaptive_step_matches_hand_computation(cls: type) -> None:
    optimizer = cls(server_lr=ETA, beta1=BETA1, beta2=BETA2, tau=TAU)
    params = {"w": np.array([1.0, 1.0])}
    path = []
    for d in UPDATES:
        params = optimizer.step(params, {"w": np.array([d, d])}, {"w"})
        path.append(float(params["w"][0]))
    assert path[0] == pytest.approx(FIRST_STEP[cls.name], abs=1e-7)
    assert path == pytest.approx(scalar_reference(cls.name), abs=1e-12)
    assert optimizer.steps == 2


def test_fedavg_step_adds_the_mean_update() -> None:
    params = {"w": np.array([1.0, 2.0], np.float32)}
    stepped = FedAvgStep().step(params, {"w": np.array([0.25, -0.5])}, {"w"})
    np.testing.assert_array_equal(stepped["w"], np.array([1.25, 1.5], np.float32))
    assert stepped["w"].dtype == np.float32


def test_buffers_take_the_plain_mean() -> None:
    params = {"w": np.array([1.0]), "running_mean": np.array([0.5], np.float32),
              "count": np.array(10, np.int64)}
    update = {"w": np.array([0.5]), "running_mean": np.array([0.25]),
              "count": np.array(99.6)}
    stepped = FedAdam(server_lr=ETA, tau=TAU).step(params, update, {"w"})
    np.testing.assert_allclose(stepped["running_mean"], [0.75])
    assert stepped["count"].dtype == np.int64
    assert int(stepped["count"]) == 110  # 10 + 99.6 rounds to 110
    # Default betas are 0.9 and 0.99, as in the hand computation.
    assert stepped["w"][0] == pytest.approx(FIRST_STEP["fedadam"], abs=1e-7)


def test_state_roundtrip_continues_identically() -> None:
    params = {"w": np.array([1.0, -1.0])}
    first = FedYogi(server_lr=ETA, tau=TAU)
    after_one = first.step(params, {"w": np.array([0.5, 0.1])}, {"w"})
    second = FedYogi(server_lr=ETA, tau=TAU)
    second.load_state_dict(first.state_dict())
    update = {"w": np.array([-0.2, 0.3])}
    np.testing.assert_array_equal(first.step(after_one, update, {"w"})["w"],
                                  second.step(after_one, update, {"w"})["w"])
    assert second.steps == 2


def test_build_by_name_and_reject_unknown() -> None:
    assert isinstance(build_server_optimizer("FedAdam", server_lr=0.5), FedAdam)
    with pytest.raises(ConfigError, match="must be one of fedavg, fedadagrad"):
        build_server_optimizer("fedsgd")
    with pytest.raises(ConfigError, match="invalid option"):
        build_server_optimizer("fedavg", beta1=0.9)
    with pytest.raises(ConfigError, match="beta2 must be in \\[0, 1\\); got 1.0"):
        FedAdam(beta2=1.0)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_site_step_equals_coordinator_strategy(name: str) -> None:
    fedopt = pytest.importorskip("prifed.strategies.fedopt")
    classes = {"fedadam": fedopt.FedAdam, "fedyogi": fedopt.FedYogi,
               "fedadagrad": fedopt.FedAdagrad}
    rng = np.random.default_rng(3)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32),
              "bn": np.ones(3, np.float32)}
    options = {"server_lr": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 1e-2}
    plain = classes[name](**options)
    plain.initialize(params, ["w"])
    site = build_server_optimizer(name, **options)
    plain_model, site_model = dict(params), dict(params)
    for server_round in (1, 2, 3):
        mean = {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32)
                for k, v in plain_model.items()}
        reply = TrainReply("a", server_round, mean, num_samples=7)
        stepped = plain.aggregate_train(server_round, plain_model, [reply])
        assert stepped is not None
        plain_model = stepped
        update = {k: mean[k].astype(np.float64) - site_model[k] for k in mean}
        site_model = site.step(site_model, update, {"w"})
    for key in params:
        np.testing.assert_allclose(site_model[key], plain_model[key], rtol=0,
                                   atol=1e-6)

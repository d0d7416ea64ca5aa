"""SCAFFOLD pinned against a hand computation, at the site and the coordinator.

Site: logistic regression on one feature, rows x = [1, -1] with labels
[1, 0], full batches, SGD lr 0.5, K = 2 steps, from w = b = 0 with server
control c = (0.2, 0.1) and site control c_i = 0. With p = sigmoid(w x + b)
the mean BCE gradient is mean((p - y) x) for w and mean(p - y) for b:

    step 1: p = (0.5, 0.5); grad = (-0.5, 0); corrected (-0.3, 0.1)
            w = 0.15, b = -0.05
    step 2: p = (sigmoid(0.1), sigmoid(-0.2)) = (0.5249792, 0.4501660)
            grad = (-0.4625934, -0.0124274); corrected (-0.2625934, 0.0875726)
            w = 0.2812967, b = -0.0937863
    c_i+ = c_i - c + (x - y) / (K lr) = (-0.2 - 0.2812967, -0.1 + 0.0937863)
         = (-0.4812967, -0.0062137)
"""

import numpy as np
import pytest

from prifed.core.engine import RoundEngine
from prifed.core.messages import TrainInstruction, TrainReply
from prifed.errors import ConfigError
from prifed.strategies import build_strategy
from prifed.strategies.base import CONTROL_DELTA_PREFIX, CONTROL_PREFIX
from prifed.training.client import SiteClient
from prifed.training.models import build_model
from prifed.transport.inprocess import InProcessTransport

from strategy_cases import reply_for

ZERO = {"linear.weight": np.zeros((1, 1), np.float32),
        "linear.bias": np.zeros(1, np.float32)}
CONFIG = {"local_steps": 2, "batch_size": 2, "lr": 0.5, "optimizer": "sgd"}


def toy_site(name="toy", seed=0):
    x = np.array([[1.0], [-1.0]], np.float32)
    y = np.array([1.0, 0.0], np.float32)
    return SiteClient(name, lambda: build_model("logreg", 1, 0), x, y, x, y, seed)


def control_instruction(server_round=1, weight=0.2, bias=0.1):
    extra = {CONTROL_PREFIX + "linear.weight": np.array([[weight]], np.float32),
             CONTROL_PREFIX + "linear.bias": np.array([bias], np.float32)}
    return TrainInstruction("toy", server_round, dict(CONFIG, scaffold=True), extra)


def test_site_step_matches_hand_computation():
    site = toy_site()
    reply = site.fit(ZERO, control_instruction())
    np.testing.assert_allclose(reply.params["linear.weight"], [[0.2812967]],
                               rtol=1e-6)
    np.testing.assert_allclose(reply.params["linear.bias"], [-0.0937863], rtol=1e-5)
    delta_w = reply.extra[CONTROL_DELTA_PREFIX + "linear.weight"]
    delta_b = reply.extra[CONTROL_DELTA_PREFIX + "linear.bias"]
    np.testing.assert_allclose(delta_w, [[-0.4812967]], rtol=1e-6)
    np.testing.assert_allclose(delta_b, [-0.0062137], rtol=1e-4)
    assert delta_w.dtype == np.float32
    np.testing.assert_allclose(site.control["linear.weight"], [[-0.4812967]],
                               rtol=1e-6)


def test_site_control_survives_restart(tmp_path):
    site = toy_site()
    site.fit(ZERO, control_instruction(1))
    site.save_state(tmp_path / "toy.safetensors")
    restarted = toy_site()
    restarted.load_state(tmp_path / "toy.safetensors")
    second = control_instruction(2, weight=-0.1, bias=0.05)
    expected = site.fit(ZERO, second)
    got = restarted.fit(ZERO, second)
    for name in ZERO:
        np.testing.assert_array_equal(got.params[name], expected.params[name])
    for name in expected.extra:
        np.testing.assert_array_equal(got.extra[name], expected.extra[name])
    np.testing.assert_array_equal(restarted.control["linear.bias"],
                                  site.control["linear.bias"])


def test_site_without_saved_control_differs_after_restart():
    # A site that forgot c_i trains differently: the state matters.
    site = toy_site()
    site.fit(ZERO, control_instruction(1))
    second = control_instruction(2, weight=-0.1, bias=0.05)
    kept = site.fit(ZERO, second)
    forgot = toy_site().fit(ZERO, second)
    assert not np.allclose(kept.params["linear.weight"],
                           forgot.params["linear.weight"])


def test_coordinator_update_matches_hand_computation():
    strategy = build_strategy("scaffold", server_lr=0.5)
    params = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(0, np.int64)}
    strategy.initialize(params, ["w"])
    rng = np.random.default_rng(0)
    first, second = strategy.configure_train(1, params, ["a", "b"], rng)
    np.testing.assert_array_equal(first.extra[CONTROL_PREFIX + "w"], [0.0, 0.0])
    replies = [
        TrainReply("a", 1, {"w": np.array([2.0, 2.0], np.float32),
                            "n": np.array(4, np.int64)}, 10,
                   extra={CONTROL_DELTA_PREFIX + "w": np.array([1.0, -1.0],
                                                               np.float32)}),
        TrainReply("b", 1, {"w": np.array([0.0, 4.0], np.float32),
                            "n": np.array(8, np.int64)}, 30,
                   extra={CONTROL_DELTA_PREFIX + "w": np.array([0.2, 0.6],
                                                               np.float32)}),
    ]
    new = strategy.aggregate_train(1, params, replies)
    # mean w = (10 * [2, 2] + 30 * [0, 4]) / 40 = [0.5, 3.5]
    # x = [1, 2] + 0.5 * ([0.5, 3.5] - [1, 2]) = [0.75, 2.75]
    np.testing.assert_allclose(new["w"], [0.75, 2.75])
    # The counter is averaged: (10 * 4 + 30 * 8) / 40 = 7.
    assert int(new["n"]) == 7
    assert new["n"].dtype == np.int64
    # c = (10 * [1, -1] + 30 * [0.2, 0.6]) / 40 = [0.4, 0.2]
    np.testing.assert_allclose(strategy.control["w"], [0.4, 0.2], rtol=1e-6)

    # Round 2, only site a replies: c moves by 10 * delta / N with N = 40,
    # the weight of every site seen so far.
    reply = TrainReply("a", 2, {"w": new["w"], "n": new["n"]}, 10,
                       extra={CONTROL_DELTA_PREFIX + "w": np.array([0.4, 0.4],
                                                                   np.float32)})
    strategy.aggregate_train(2, new, [reply])
    np.testing.assert_allclose(strategy.control["w"], [0.5, 0.3], rtol=1e-6)
    instruction = strategy.configure_train(3, new, ["a"], rng)[0]
    np.testing.assert_allclose(instruction.extra[CONTROL_PREFIX + "w"], [0.5, 0.3],
                               rtol=1e-6)


class ForgetfulSite:
    """A site that replies with its model but without control deltas."""

    name = "forgetful"

    def fit(self, params, instruction):
        return TrainReply(self.name, instruction.server_round, dict(params), 5)

    def evaluate(self, params):
        raise RuntimeError("not used")


class DutifulSite(ForgetfulSite):
    name = "dutiful"

    def fit(self, params, instruction):
        return reply_for(instruction, params, 5, delta_scale=0.5)


def test_reply_without_control_delta_is_rejected():
    params = {"w": np.ones(2, np.float32)}
    engine = RoundEngine(build_strategy("scaffold"),
                         InProcessTransport([ForgetfulSite(), DutifulSite()]),
                         num_rounds=1, evaluate_every=2)
    engine.run(params, ["w"])
    record = engine.history[0]
    assert record.rejected == {"forgetful": "missing extra tensor"}
    assert record.accepted == ["dutiful"]
    np.testing.assert_allclose(engine.strategy.control["w"], [0.5, 0.5])


def test_scaffold_rejects_adaptive_local_optimiser():
    with pytest.raises(ConfigError, match="plain SGD"):
        build_strategy("scaffold", local_config={"optimizer": "adam"})

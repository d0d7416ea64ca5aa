"""The round engine: validation, zero weights and failures."""

from collections.abc import Mapping

import numpy as np
import pytest

from prifed.core.engine import RoundEngine
from prifed.core.messages import EvaluateReply, TrainInstruction, TrainReply
from prifed.core.strategy import FedAvg
from prifed.transport.inprocess import InProcessTransport

GLOBAL = {"w": np.zeros(3, np.float32), "n": np.array(0, np.int64)}


class FixedSite:
    """A site that returns a fixed update and sample count."""

    def __init__(self, name, params, num_samples, error=None):
        self.name = name
        self.params = params
        self.num_samples = num_samples
        self.error = error

    def fit(self, params: Mapping[str, np.ndarray],
            instruction: TrainInstruction) -> TrainReply:
        if self.error is not None:
            raise self.error
        return TrainReply(self.name, instruction.server_round,
                          {k: np.array(v) for k, v in self.params.items()},
                          self.num_samples)

    def evaluate(self, params):
        return EvaluateReply(self.name, 1, {"accuracy": float(params["w"][0])})


def update(value, count=3):
    return {"w": np.full(3, value, np.float32), "n": np.array(count, np.int64)}


def run_one_round(sites):
    engine = RoundEngine(FedAvg(), InProcessTransport(sites), num_rounds=1)
    final = engine.run(GLOBAL, trainable=["w"])
    return final, engine.history[0]


def test_weights_follow_reported_samples():
    final, record = run_one_round([FixedSite("a", update(1.0), 10),
                                   FixedSite("b", update(3.0), 30)])
    # (10 * 1 + 30 * 3) / 40 = 2.5
    np.testing.assert_allclose(final["w"], 2.5)
    assert final["w"].dtype == np.float32
    assert final["n"].dtype == np.int64
    assert record.accepted == ["a", "b"]


def test_zero_sample_site_is_left_out():
    final, record = run_one_round([FixedSite("a", update(1.0), 10),
                                   FixedSite("b", update(100.0), 0)])
    np.testing.assert_allclose(final["w"], 1.0)
    assert "b" in record.accepted


def test_zero_total_weight_keeps_previous_model(caplog):
    final, record = run_one_round([FixedSite("a", update(5.0), 0)])
    assert record.skipped
    np.testing.assert_array_equal(final["w"], GLOBAL["w"])
    assert "round skipped" in caplog.text


@pytest.mark.parametrize("bad, reason, tensor", [
    ({"w": np.array([np.nan, 0, 0], np.float32), "n": np.array(1)},
     "NaN", "w"),
    ({"w": np.array([np.inf, 0, 0], np.float32), "n": np.array(1)},
     "infinite", "w"),
    ({"w": np.zeros(3, np.float32)}, "missing tensor", "n"),
    ({"w": np.zeros(3, np.float32), "n": np.array(1), "x": np.zeros(1)},
     "unexpected tensor", "x"),
    ({"w": np.zeros(4, np.float32), "n": np.array(1)}, "shape", "w"),
    ({"w": np.zeros(3, np.float64), "n": np.array(1)}, "dtype", "w"),
    ({"w": np.zeros(3, np.float32), "n": np.array(1, np.int32)}, "dtype", "n"),
])
def test_bad_update_is_rejected_and_round_goes_on(bad, reason, tensor, caplog):
    final, record = run_one_round([FixedSite("good", update(2.0), 5),
                                   FixedSite("bad", bad, 5)])
    np.testing.assert_allclose(final["w"], 2.0)
    assert record.accepted == ["good"]
    assert reason in record.rejected["bad"]
    assert f"site 'bad', tensor '{tensor}'" in caplog.text


def test_failing_site_becomes_failure():
    final, record = run_one_round([FixedSite("good", update(2.0), 5),
                                   FixedSite("down", update(9.0), 5,
                                             RuntimeError("disk full"))])
    np.testing.assert_allclose(final["w"], 2.0)
    assert "disk full" in record.failures["down"]


def test_sites_per_round_samples_with_seed():
    sites = [FixedSite(str(i), update(float(i)), 1) for i in range(6)]
    chosen = []
    for _ in range(2):
        engine = RoundEngine(FedAvg(sites_per_round=2), InProcessTransport(sites),
                             num_rounds=3, seed=7)
        engine.run(GLOBAL, ["w"])
        chosen.append([r.sites for r in engine.history])
    assert chosen[0] == chosen[1]
    assert all(len(s) == 2 for s in chosen[0])


class EchoTransport(InProcessTransport):
    """Delivers every reply of every site twice, and one from a stranger."""

    def train(self, server_round, params, instructions):
        for reply in super().train(server_round, params, instructions):
            yield reply
            yield reply
        yield TrainReply("stranger", server_round, update(50.0), 10)


def test_duplicate_and_unselected_replies_are_rejected():
    engine = RoundEngine(FedAvg(), EchoTransport([FixedSite("a", update(1.0), 4)]),
                         num_rounds=1)
    final = engine.run(GLOBAL, ["w"])
    record = engine.history[0]
    np.testing.assert_allclose(final["w"], 1.0)
    assert record.accepted == ["a"]
    assert "second reply" in record.rejected["a"]
    assert "not selected" in record.rejected["stranger"]


def test_negative_sample_count_is_rejected():
    final, record = run_one_round([FixedSite("good", update(2.0), 5),
                                   FixedSite("liar", update(9.0), -3)])
    np.testing.assert_allclose(final["w"], 2.0)
    assert "num_samples" in record.rejected["liar"]

"""Secure aggregation inside the round engine, with numpy stand-in sites."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from prifed.core.engine import RoundEngine
from prifed.core.messages import EvaluateReply, TrainInstruction, TrainReply
from prifed.core.strategy import FedAvg
from prifed.errors import ConfigError, NotSupportedError
from prifed.secagg import FixedPoint, SecAggConfig
from prifed.secagg.messages import MASKED_INPUT
from prifed.secagg.transport import secure_transport
from prifed.transport.inprocess import InProcessTransport


class StepSite:
    """A site whose local training moves each value by a fixed site offset."""

    def __init__(self, name: str, offset: float, samples: int,
                 fail_round: int | None = None) -> None:
        self.name = name
        self.offset = offset
        self.samples = samples
        self.fail_round = fail_round

    def fit(self, params: Mapping[str, np.ndarray],
            instruction: TrainInstruction) -> TrainReply:
        if instruction.server_round == self.fail_round:
            raise RuntimeError("local training crashed")
        moved = {name: (value + self.offset * np.cos(np.arange(value.size))
                        .reshape(value.shape)).astype(value.dtype)
                 for name, value in params.items()}
        return TrainReply(self.name, instruction.server_round, moved, self.samples,
                          {"loss": abs(self.offset)})

    def evaluate(self, params: Mapping[str, np.ndarray]) -> EvaluateReply:
        return EvaluateReply(self.name, 10, {"accuracy": 0.5})


def make_sites(fail_round: int | None = None) -> list[StepSite]:
    return [StepSite("a", 0.1, 30), StepSite("b", -0.05, 10),
            StepSite("c", 0.02, 60, fail_round), StepSite("d", 0.3, 5),
            StepSite("e", -0.2, 25)]


def initial() -> dict[str, np.ndarray]:
    return {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
            "b": np.zeros(2, dtype=np.float32)}


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_engine_matches_plain_fedavg(mode: str) -> None:
    plain = RoundEngine(FedAvg(), InProcessTransport(make_sites()), 3)
    expected = plain.run(initial(), ["w", "b"])
    strategy = FedAvg()
    transport = secure_transport(mode, strategy, InProcessTransport(make_sites()),
                                 initial())
    engine = RoundEngine(strategy, transport, 3)
    result = engine.run(initial(), ["w", "b"])
    for name in expected:
        assert result[name].dtype == expected[name].dtype
        # Three rounds, each within 2**-17 of the plain mean, plus float32 casts.
        assert np.max(np.abs(result[name] - expected[name])) < 3 * 2.0**-17 + 1e-6
    assert engine.history[0].accepted == ["a", "b", "c", "d", "e"]
    assert engine.history[0].train_metrics["d"] == {"loss": 0.3}


def test_abort_keeps_previous_model() -> None:
    strategy = FedAvg()

    def drops(server_round: int) -> dict[str, list[str]]:
        # Threshold 3 of 5: three sites missing upload in round 2 leave two.
        return {MASKED_INPUT: ["a", "b", "c"]} if server_round == 2 else {}

    transport = secure_transport("secagg", strategy, InProcessTransport(make_sites()),
                                 initial(), dropouts=drops)
    engine = RoundEngine(strategy, transport, 3)
    first = engine.run_round(1, initial())
    second = engine.run_round(2, first)
    third = engine.run_round(3, second)
    assert engine.history[1].skipped
    for name in first:
        assert np.array_equal(second[name], first[name])
        assert not np.array_equal(third[name], second[name])
    assert not engine.history[2].skipped


def test_failed_site_left_out() -> None:
    strategy = FedAvg()
    transport = secure_transport("secagg+", strategy,
                                 InProcessTransport(make_sites(fail_round=1)),
                                 initial())
    engine = RoundEngine(strategy, transport, 1)
    result = engine.run(initial(), ["w", "b"])
    record = engine.history[0]
    assert "local training crashed" in record.failures["c"]
    assert record.accepted == ["a", "b", "d", "e"]
    plain = RoundEngine(FedAvg(), InProcessTransport(
        [site for site in make_sites() if site.name != "c"]), 1)
    expected = plain.run(initial(), ["w", "b"])
    assert np.max(np.abs(result["w"] - expected["w"])) < 2.0**-17 + 1e-6


class NeedsEachUpdate(FedAvg):
    """A strategy that reads every reply, as SCAFFOLD and FedBuff do."""

    name = "needs-each"
    needs_individual_updates = True


def test_strategy_needing_updates_rejected() -> None:
    with pytest.raises(NotSupportedError, match="strategy 'needs-each' needs each "
                       "site's update, which secure aggregation .secagg\\+. hides"):
        secure_transport("secagg+", NeedsEachUpdate(),
                         InProcessTransport(make_sites()), initial())


@pytest.mark.parametrize("name", ["scaffold", "fedbuff"])
def test_registered_strategies_rejected(name: str) -> None:
    from prifed.strategies import build_strategy

    with pytest.raises(NotSupportedError, match=f"strategy '{name}' needs each"):
        secure_transport("secagg", build_strategy(name),
                         InProcessTransport(make_sites()), initial())


@pytest.mark.parametrize("name", ["fedprox", "fedadam", "fedyogi", "fedadagrad"])
def test_mean_only_strategies_accepted(name: str) -> None:
    from prifed.strategies import build_strategy

    strategy = build_strategy(name)
    transport = secure_transport("secagg+", strategy,
                                 InProcessTransport(make_sites()), initial())
    engine = RoundEngine(strategy, transport, 2)
    result = engine.run(initial(), ["w", "b"])
    assert not any(record.skipped for record in engine.history)
    assert not np.array_equal(result["w"], initial()["w"])


def test_start_up_rejects_wrapping_sum() -> None:
    # One site may contribute 2**21 * 1.0 * 2**40 = 2**61, so 3 sites fit in
    # the 64-bit modulus and the 5 sites of this run do not.
    config = SecAggConfig("secagg", encoding=FixedPoint(
        clip=1.0, precision_bits=40, max_samples=2**21))
    with pytest.raises(ConfigError, match="cannot take 5 sites.*the largest number "
                       "of sites this configuration takes is 3"):
        secure_transport("secagg", FedAvg(), InProcessTransport(make_sites()),
                         initial(), config=config)


def test_start_up_rejects_unknown_mode() -> None:
    with pytest.raises(ConfigError, match="must be one of off, secagg, secagg\\+"):
        secure_transport("masked", FedAvg(), InProcessTransport(make_sites()),
                         initial())


def test_plain_train_call_rejected() -> None:
    transport = secure_transport("secagg", FedAvg(), InProcessTransport(make_sites()),
                                 initial())
    with pytest.raises(NotSupportedError, match="sends no individual update"):
        transport.train(1, initial(), [])

"""CKKS through the round engine and the in-process transport."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pytest

from prifed.core.engine import RoundEngine
from prifed.core.messages import EvaluateReply, Failure, TrainInstruction, TrainReply
from prifed.core.params import ParameterSet
from prifed.core.strategy import FedAvg, Strategy
from prifed.errors import ConfigError, NotSupportedError
from prifed.he.packing import is_encrypted
from prifed.he.simulate import HomomorphicSettings, final_model, homomorphic_federation
from prifed.he.strategy import HomomorphicStrategy
from prifed.transport.inprocess import InProcessTransport

SITES = {"cleveland": (200, 0.3), "hungary": (171, -0.2), "va": (85, 0.1)}


class NumpyClient:
    """A site whose 'training' moves the model 10% towards its own target."""

    def __init__(self, name: str, rows: int, target: float,
                 fail_in_round: int | None = None) -> None:
        self.name = name
        self.num_train = rows
        self.target = target
        self.fail_in_round = fail_in_round

    def fit(self, params: Mapping[str, np.ndarray],
            instruction: TrainInstruction) -> TrainReply:
        if instruction.server_round == self.fail_in_round:
            raise RuntimeError("disk full")
        # A proximal term pulls towards the global model: a smaller step.
        rate = 0.1 / (1.0 + float(instruction.config.get("proximal_mu", 0.0)))
        local = {k: ((1 - rate) * v + rate * self.target).astype(v.dtype)
                 for k, v in params.items()}
        return TrainReply(self.name, instruction.server_round, local, self.num_train)

    def evaluate(self, params: Mapping[str, np.ndarray]) -> EvaluateReply:
        value = float(np.mean(params["w"]))
        return EvaluateReply(self.name, 10, {"mean_w": value})


def initial() -> ParameterSet:
    return {"w": np.linspace(-1, 1, 14, dtype=np.float32),
            "b": np.zeros(1, np.float32)}


def clients(fail: dict[str, int] | None = None) -> list[NumpyClient]:
    fail = fail or {}
    return [NumpyClient(name, rows, target, fail.get(name))
            for name, (rows, target) in SITES.items()]


def run_plain(strategy: Strategy, fail: dict[str, int] | None = None) -> ParameterSet:
    engine = RoundEngine(strategy, InProcessTransport(clients(fail)), 4, seed=1)
    return engine.run(initial(), ["w", "b"])


def run_encrypted(strategy: Strategy, options: dict[str, float],
                  fail: dict[str, int] | None = None
                  ) -> tuple[ParameterSet, ParameterSet, RoundEngine]:
    he_strategy, wrapped = homomorphic_federation(
        strategy, options, clients(fail), initial(), ["w", "b"],
        HomomorphicSettings(precision=1e-7))
    engine = RoundEngine(he_strategy, InProcessTransport(wrapped), 4, seed=1)
    relayed = engine.run(initial(), ["w", "b"])
    return final_model(wrapped), relayed, engine


def test_fedavg_through_engine_matches_plain() -> None:
    model, relayed, engine = run_encrypted(FedAvg(), {})
    plain = run_plain(FedAvg())
    assert is_encrypted(relayed)
    for name in plain:
        np.testing.assert_allclose(model[name], plain[name], rtol=0, atol=1e-6)
    assert all(record.accepted == list(SITES) for record in engine.history)
    # Evaluation ran on the model each site decrypted.
    last = engine.history[-1].eval_metrics
    assert last["va"]["mean_w"] == pytest.approx(float(np.mean(plain["w"])), abs=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_server_optimiser_through_engine_matches_plain(name: str) -> None:
    strategies = pytest.importorskip("prifed.strategies")
    options = {"server_lr": 0.05, "tau": 1e-2}
    model, _, _ = run_encrypted(strategies.build_strategy(name, **options), options)
    plain = run_plain(strategies.build_strategy(name, **options))
    for key in plain:
        np.testing.assert_allclose(model[key], plain[key], rtol=0, atol=1e-6)


def test_fedprox_mu_reaches_the_sites() -> None:
    strategies = pytest.importorskip("prifed.strategies")
    model, _, _ = run_encrypted(strategies.build_strategy("fedprox", mu=1.0), {})
    plain = run_plain(strategies.build_strategy("fedprox", mu=1.0))
    fedavg = run_plain(FedAvg())
    np.testing.assert_allclose(model["w"], plain["w"], rtol=0, atol=1e-6)
    assert np.abs(plain["w"] - fedavg["w"]).max() > 1e-3


def test_secret_coordinator_context_rejected() -> None:
    _, wrapped = homomorphic_federation(FedAvg(), {}, clients(), initial(),
                                        ["w", "b"])
    with pytest.raises(ConfigError, match="contains the secret key"):
        HomomorphicStrategy(FedAvg(), wrapped[0].site.key)


def test_failed_site_stays_in_step() -> None:
    model, _, engine = run_encrypted(FedAvg(), {}, fail={"hungary": 2})
    plain = run_plain(FedAvg(), fail={"hungary": 2})
    assert "hungary" in engine.history[1].failures
    assert engine.history[2].accepted == list(SITES)
    np.testing.assert_allclose(model["w"], plain["w"], rtol=0, atol=1e-6)


def test_sampled_rounds_keep_every_site_in_step() -> None:
    model, _, engine = run_encrypted(FedAvg(sites_per_round=2), {})
    plain = run_plain(FedAvg(sites_per_round=2))
    assert all(len(record.sites) == 2 for record in engine.history)
    np.testing.assert_allclose(model["w"], plain["w"], rtol=0, atol=1e-6)


def test_tampered_reply_is_rejected_by_engine() -> None:
    he_strategy, wrapped = homomorphic_federation(
        FedAvg(), {}, clients(), initial(), ["w", "b"])

    class Truncating(InProcessTransport):
        def train(self, server_round: int, params: Mapping[str, np.ndarray],
                  instructions: Sequence[TrainInstruction]
                  ) -> Iterator[TrainReply | Failure]:
            for reply in super().train(server_round, params, instructions):
                if isinstance(reply, TrainReply) and reply.site == "va":
                    reply.params["he.ct.00000"] = reply.params["he.ct.00000"][:50]
                yield reply

    engine = RoundEngine(he_strategy, Truncating(wrapped), 2, seed=1)
    engine.run(initial(), ["w", "b"])
    assert "cannot be parsed" in engine.history[0].rejected["va"]
    assert engine.history[0].accepted == ["cleveland", "hungary"]


def test_strategy_needing_clear_updates_is_rejected() -> None:
    class Scaffoldish(FedAvg):
        name = "scaffold"

    with pytest.raises(NotSupportedError, match="choose one of fedavg, fedprox"):
        HomomorphicStrategy(Scaffoldish(), None)  # type: ignore[arg-type]

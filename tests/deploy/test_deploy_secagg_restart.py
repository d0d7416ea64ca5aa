"""A coordinator killed in round 2's secure-aggregation phases and started again.

Four heart sites run three rounds of FedAvg with ``secagg+``: Cleveland,
Hungary and Switzerland as real processes, VA Long Beach as an agent in this
process. When VA Long Beach has replied to round 2's ``share_keys`` phase,
its event hook blocks it. The other three store their masked inputs, and
then the coordinator is killed with SIGKILL and started again. The restarted
coordinator has lost the protocol state of the interrupted attempt, so it
runs round 2 again from training with fresh keys. Every site
then trains twice on model 1, and its second update, from the next batches
of its stream, goes into the sum. The test pins the final model against an
in-process run in which every site trains twice in round 2.
"""

from __future__ import annotations

import functools
import json
import math
import re
import signal
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from deploy_harness import Federation, stop, wait_until

from prifed.core.messages import EvaluateReply, TrainInstruction, TrainReply
from prifed.core.params import copy_params, params_from_bytes
from prifed.deploy.config import load_config
from prifed.deploy.secure import PHASE_CHANNEL
from prifed.deploy.store import ExchangeReplyRow
from prifed.secagg.messages import MASKED_INPUT, SHARE_KEYS
from prifed.training.client import SiteClient

ROUNDS, STEPS, LR = 3, 20, 0.05
MODE = "secagg+"
BLOCKED = "VA Long Beach"
RERUN_ROUND = 2


class Scenario:
    """The hook of the blocked site: kill the coordinator once masked inputs are in."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.restart_done = False
        self.restarted = threading.Event()
        self.killed_exchange = ""
        self.killed_with: list[str] = []
        self.error: BaseException | None = None

    def __call__(self, name: str, details: dict[str, Any]) -> None:
        exchange = str(details.get("exchange", ""))
        if (name != "exchanged" or self.restart_done
                or details.get("channel") != PHASE_CHANNEL
                or not exchange.startswith(f"secagg-{RERUN_ROUND}-")
                or not exchange.endswith(f"-{SHARE_KEYS}")):
            return
        self.restart_done = True
        try:
            self.kill_and_restart(exchange.removesuffix(SHARE_KEYS) + MASKED_INPUT)
        except BaseException as error:
            self.error = error
            self.restarted.set()
            raise

    def kill_and_restart(self, exchange: str) -> None:
        # This site has not sent its masked input, so the phase stays open and
        # the other sites wait in their long polls, with nothing in flight.
        store = self.fed.store()
        others = sorted(s for s in self.fed.sites if s != BLOCKED)
        wait_until(lambda: sorted(store.exchange_replies(exchange)) == others, 60,
                   f"three masked inputs in exchange {exchange}")
        self.killed_exchange = exchange
        self.killed_with = sorted(store.exchange_replies(exchange))
        store.close()
        stop(self.fed.coordinator, signal.SIGKILL)
        self.fed.start_coordinator()
        self.restarted.set()


class TrainsTwice:
    """A site that trains once more, and discards it, before its update of a round.

    It replays what a deployed site does when the coordinator reruns the round.
    """

    def __init__(self, client: SiteClient, server_round: int) -> None:
        self.client = client
        self.name = client.name
        self.server_round = server_round

    def fit(self, params: Mapping[str, np.ndarray],
            instruction: TrainInstruction) -> TrainReply:
        """Train on ``params``, after one discarded training in the rerun round."""
        if instruction.server_round == self.server_round:
            self.client.fit(copy_params(params), instruction)
        return self.client.fit(params, instruction)

    def evaluate(self, params: Mapping[str, np.ndarray]) -> EvaluateReply:
        """Evaluate on the site's test rows."""
        return self.client.evaluate(params)


@functools.lru_cache(maxsize=1)
def simulated_first_round() -> dict[str, np.ndarray]:
    """Return round 1's model of ``prifed simulate --secure-aggregation``."""
    from prifed.simulation import SimulationConfig, run_simulation

    config = SimulationConfig(model="logreg", strategy="fedavg", rounds=1,
                              local_steps=STEPS, batch_size=4, lr=LR,
                              optimizer="sgd", standardize="federated",
                              test_fraction=0.34, seed=42, baselines=False,
                              secure_aggregation=MODE)
    return run_simulation(config).model


@functools.lru_cache(maxsize=2)
def simulated_rerun(rounds: int, rerun_round: int, double: bool = True
                    ) -> dict[str, np.ndarray]:
    """Return the in-process secure model when every site trains twice in a round."""
    from prifed.core.engine import RoundEngine
    from prifed.secagg.transport import secure_transport
    from prifed.strategies import build_strategy
    from prifed.training.models import build_model, get_params, trainable_names
    from prifed.transport.inprocess import InProcessTransport

    sites = heart_sites()
    num_features = sites[0].train_x.shape[1]

    def factory():
        return build_model("logreg", num_features, 42)

    local = {"local_steps": STEPS, "batch_size": 4, "lr": LR, "optimizer": "sgd"}
    strategy = build_strategy("fedavg", local_config=local)
    clients = [SiteClient(s.name, factory, s.train_x, s.train_y, s.test_x, s.test_y,
                          42 + i) for i, s in enumerate(sites)]
    wrapped = [TrainsTwice(c, rerun_round if double else 0) for c in clients]
    model = factory()
    params = get_params(model)
    transport = secure_transport(MODE, strategy, InProcessTransport(wrapped), params)
    engine = RoundEngine(strategy, transport, rounds, seed=42)
    return engine.run(params, trainable_names(model))


def heart_sites() -> list[Any]:
    """Return the four heart sites split and standardised as in the deployment."""
    from prifed.sitedata import prepare_sites

    return prepare_sites(None, None, 42, 0.34, "federated")


def site_accuracies(params: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Evaluate ``params`` in process on each site's test rows."""
    from prifed.training.models import build_model

    sites = heart_sites()
    num_features = sites[0].train_x.shape[1]
    accuracies = {}
    for site in sites:
        client = SiteClient(site.name, lambda: build_model("logreg", num_features, 42),
                            site.train_x, site.train_y, site.test_x, site.test_y, 42)
        accuracies[site.name] = float(client.evaluate(params).metrics["accuracy"])
    return accuracies


@pytest.fixture(scope="module")
def rerun(tmp_path_factory):
    root = tmp_path_factory.mktemp("secagg-restart")
    fed = Federation.create(root, rounds=ROUNDS, local_steps=STEPS, lr=LR,
                            keep_updates=True,
                            extra=f'secure_aggregation = "{MODE}"')
    path = root / "federation.toml"
    path.write_text(path.read_text().replace(
        "[rounds]\n", "[rounds]\nphase_deadline_seconds = 30\n"))
    fed.config = load_config(path)
    scenario = Scenario(fed)
    try:
        fed.start_coordinator()
        first = fed.coordinator
        processes = [fed.start_site(s) for s in fed.sites if s != BLOCKED]
        blocked = threading.Thread(target=fed.agent(BLOCKED, events=scenario).run,
                                daemon=True)
        blocked.start()
        fed.wait_coordinator()
        scenario.restarted.wait(120)
        code = fed.wait_coordinator()
        blocked.join(60)
        site_codes = [process.wait(60) for process in processes]
        yield fed, scenario, first, code, site_codes, blocked.is_alive()
    finally:
        fed.close()


def test_secure_rerun_finishes(rerun):
    fed, scenario, first, code, site_codes, blocked_alive = rerun
    assert scenario.error is None, repr(scenario.error)
    assert scenario.restart_done
    assert first.returncode == -signal.SIGKILL
    assert code == 0, fed.output("coordinator")[-4000:]
    assert site_codes == [0, 0, 0]
    assert not blocked_alive


def test_killed_after_three_masked_inputs(rerun):
    fed, scenario, _, _, _, _ = rerun
    others = sorted(s for s in fed.sites if s != BLOCKED)
    assert scenario.killed_with == others
    assert scenario.killed_exchange.endswith(f"-{MASKED_INPUT}")


def test_rounds_committed_once(rerun):
    fed, _, _, _, _, _ = rerun
    store = fed.store()
    records = store.round_records()
    accepted = [store.accepted_updates(r) for r in range(1, ROUNDS + 1)]
    store.close()
    assert [r["server_round"] for r in records] == [1, 2, 3]
    for record in records:
        assert sorted(record["accepted"]) == sorted(fed.sites)
        assert record["failures"] == {}
        assert record["rejected"] == {}
    assert accepted == [{}, {}, {}]


def test_first_round_equals_simulated(rerun):
    fed, _, _, _, _, _ = rerun
    path = fed.state_dir / "models" / "model-0001.safetensors"
    deployed = params_from_bytes(path.read_bytes())
    reference = simulated_first_round()
    assert sorted(deployed) == sorted(reference)
    for name, value in reference.items():
        assert deployed[name].dtype == value.dtype
        assert np.array_equal(deployed[name], value), name


def test_final_model_equals_rerun_reference(rerun):
    fed, _, _, _, _, _ = rerun
    deployed = fed.final_model()
    reference = simulated_rerun(ROUNDS, RERUN_ROUND)
    for name, value in reference.items():
        assert np.all(np.isfinite(deployed[name])), name
        assert np.array_equal(deployed[name], value), name
    # The rerun trained on the next batches, so the model is not the one an
    # uninterrupted run ends with.
    uninterrupted = simulated_rerun(ROUNDS, RERUN_ROUND, double=False)
    assert not np.array_equal(deployed["linear.weight"],
                              uninterrupted["linear.weight"])


def test_final_accuracy_reasonable(rerun):
    fed, _, _, _, _, _ = rerun
    summary = json.loads((fed.state_dir / "summary.json").read_text())
    per_site = {site: m["accuracy"] for site, m in summary["final"]["per_site"].items()}
    expected = site_accuracies(simulated_rerun(ROUNDS, RERUN_ROUND))
    assert per_site == pytest.approx(expected, abs=1e-6)
    accuracy = summary["final"]["mean_accuracy"]
    assert math.isfinite(accuracy)
    # Better than predicting each site's majority class, and close to the
    # model of an uninterrupted run.
    majority = [max(np.mean(s.test_y), 1 - np.mean(s.test_y)) for s in heart_sites()]
    assert accuracy > np.mean(majority)
    uninterrupted = site_accuracies(simulated_rerun(ROUNDS, RERUN_ROUND, False))
    assert accuracy == pytest.approx(np.mean(list(uninterrupted.values())), abs=0.03)


def test_no_update_stored(rerun):
    fed, _, _, _, _, _ = rerun
    for folder in ("updates", "uploads"):
        stored = [p for p in (fed.state_dir / folder).rglob("*") if p.is_file()]
        assert stored == [], folder


def test_protocol_messages_deleted(rerun):
    fed, scenario, _, _, _, _ = rerun
    store = fed.store()
    try:
        # Neither the interrupted attempt's shares nor a committed round's
        # messages stay in the database.
        assert store.exchange_replies(scenario.killed_exchange) == {}
        with store.session() as session:
            left = [row.exchange for row in session.query(ExchangeReplyRow)]
    finally:
        store.close()
    assert [e for e in left if e.startswith("secagg-")] == []
    log = fed.log_file.read_text()
    assert re.search(r"secagg round 2/3: deleted \d+ stored protocol messages of "
                     r"earlier rounds and attempts", log)


def test_log_says_round_rerun(rerun):
    fed, _, _, _, _, _ = rerun
    log = fed.log_file.read_text()
    assert "coordinator: resuming after round 1 of 3" in log
    assert ("secagg round 2/3: started before a restart and not committed; "
            "running it again from training with fresh keys") in log
    closed = re.findall(r"secagg round 2/3: phase masked_input closed with "
                        r"(\d) of 4 replies", log)
    assert closed == ["4"]

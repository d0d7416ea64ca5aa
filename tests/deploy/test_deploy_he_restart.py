"""A CKKS run whose coordinator and one site are killed with SIGKILL and restarted.

Four heart sites run three rounds of FedAvg with homomorphic aggregation.
Cleveland, Hungary and Switzerland are real processes, and VA Long Beach is
an agent in this process that uploads in 4 KiB chunks. In round 2, once the
other three updates are accepted and VA Long Beach has sent two chunks, the
coordinator is killed with SIGKILL and started again. Once round 2 is
committed, the Cleveland process is killed with SIGKILL and started again
from its state folder. Every site must still save the same decrypted model,
equal to ``prifed simulate --homomorphic`` within the CKKS error, while the
coordinator holds only the context without the secret key.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
from typing import Any

import numpy as np
import pytest
from deploy_harness import Federation, he_federation, stop, wait_until

from prifed.core.params import params_from_bytes
from prifed.deploy.hesite import STATE_FILE, HESiteAgent
from prifed.he.keys import read_key_file
from prifed.he.packing import is_encrypted
from prifed.he.params import HomomorphicSettings

ROUNDS, STEPS, LR = 3, 20, 0.01
TOLERANCE = 1e-5
"""Largest difference per weight: three rounds of means with error at most 1e-6."""
CHUNK = 4096
IN_PROCESS = "VA Long Beach"
RESTARTED_SITE = "Cleveland"
RESUMED = "fit round 2/3: resumed (attempt 1) with 3 accepted updates"


def simulated_homomorphic() -> dict[str, np.ndarray]:
    """Return the model of ``prifed simulate --homomorphic`` with the same settings."""
    from prifed.simulation import SimulationConfig, run_simulation

    config = SimulationConfig(model="logreg", strategy="fedavg", rounds=ROUNDS,
                              local_steps=STEPS, batch_size=4, lr=LR,
                              optimizer="sgd", standardize="federated",
                              test_fraction=0.34, seed=42, baselines=False,
                              homomorphic=HomomorphicSettings())
    return run_simulation(config).model


class Scenario:
    """The in-process site's hook: kill the coordinator during its round-2 upload."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.killed_with: list[str] = []
        self.restart_done = False

    def __call__(self, name: str, details: dict[str, Any]) -> None:
        self.events.append((name, dict(details)))
        if name != "chunk" or details["round"] != 2 or self.restart_done:
            return
        if details["offset"] < 2 * CHUNK:
            return
        self.restart_done = True
        store = self.fed.store()
        wait_until(lambda: len(store.accepted_updates(2)) == 3, 60,
                   "three accepted updates in round 2")
        self.killed_with = sorted(store.accepted_updates(2))
        store.close()
        stop(self.fed.coordinator, signal.SIGKILL)
        self.fed.start_coordinator()
        # The restarted coordinator listens before it reopens round 2; a chunk
        # sent in between gets 503 not_ready, which the agent retries.
        self.events.append(("restarted", {}))


def restart_site_after_round_two(fed: Federation, processes: dict[str, Any],
                                 killed: list[subprocess.Popen[bytes]]) -> None:
    """Kill one site process with SIGKILL once round 2 is committed; start it again."""
    store = fed.store()
    try:
        wait_until(lambda: (row := store.latest_model()) is not None
                   and row.version >= 2, 120, "round 2 to be committed")
    finally:
        store.close()
    first = processes[RESTARTED_SITE]
    stop(first, signal.SIGKILL)
    killed.append(first)
    processes[RESTARTED_SITE] = fed.start_site(
        RESTARTED_SITE, ["--he-key", str(fed.root / "site.ctx"), "--threads", "1"])


@pytest.fixture(scope="module")
def he_restart_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("he-restart")
    fed = he_federation(root, rounds=ROUNDS, local_steps=STEPS, lr=LR)
    try:
        fed.start_coordinator()
        first_coordinator = fed.coordinator
        processes = {site: fed.start_site(site, ["--he-key", str(root / "site.ctx"),
                                                 "--threads", "1"])
                     for site in fed.sites if site != IN_PROCESS}
        scenario = Scenario(fed)
        plain = fed.agent(IN_PROCESS, chunk_bytes=CHUNK)
        agent = HESiteAgent(plain.options, plain.source, events=scenario,
                            key_file=root / "site.ctx")
        killed_sites: list[subprocess.Popen[bytes]] = []
        threads = [threading.Thread(target=agent.run, daemon=True),
                   threading.Thread(target=restart_site_after_round_two,
                                    args=(fed, processes, killed_sites),
                                    daemon=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        code = fed.wait_coordinator(180)
        site_codes = {site: process.wait(60) for site, process in processes.items()}
        yield fed, scenario, code, first_coordinator, site_codes, killed_sites
    finally:
        fed.close()


def site_model(fed: Federation, site: str) -> dict[str, np.ndarray]:
    path = fed.site_dir(site) / "final_model.safetensors"
    return params_from_bytes(path.read_bytes())


def test_restarted_run_matches_simulation(he_restart_run, simulated):
    fed, scenario, code, _, site_codes, _ = he_restart_run
    assert scenario.restart_done
    assert code == 0, fed.output("coordinator")[-4000:]
    assert site_codes == {"Cleveland": 0, "Hungary": 0, "Switzerland": 0}
    deployed = site_model(fed, fed.sites[0])
    for reference in (simulated_homomorphic(), simulated(ROUNDS, STEPS, LR)):
        assert sorted(deployed) == sorted(reference)
        for name, value in reference.items():
            assert np.max(np.abs(deployed[name] - value)) < TOLERANCE, name


def test_every_site_decrypts_same_model(he_restart_run):
    fed, _, _, _, _, _ = he_restart_run
    first = site_model(fed, fed.sites[0])
    for site in fed.sites[1:]:
        model = site_model(fed, site)
        assert sorted(model) == sorted(first), site
        for name, value in first.items():
            assert np.array_equal(model[name], value), (site, name)


def test_coordinator_was_killed_mid_round(he_restart_run):
    fed, scenario, _, first, _, _ = he_restart_run
    assert first.returncode == -signal.SIGKILL
    assert scenario.killed_with == ["Cleveland", "Hungary", "Switzerland"]
    log = fed.log_file.read_text()
    assert "coordinator: resuming after round 1 of 3" in log
    assert RESUMED in log
    rejected = [d for name, d in scenario.events if name == "rejected"]
    assert rejected == []


def test_site_resumed_from_saved_state(he_restart_run):
    fed, _, _, _, _, killed = he_restart_run
    assert [process.returncode for process in killed] == [-signal.SIGKILL]
    log = (fed.site_dir(RESTARTED_SITE) / "agent.log").read_text()
    restored = re.findall(r"restored the CKKS state after round (\d+)", log)
    assert restored in (["1"], ["2"]), restored
    saved = fed.site_dir(RESTARTED_SITE) / STATE_FILE
    state = params_from_bytes(saved.read_bytes())
    assert int(state["applied_round"]) == ROUNDS


def test_every_update_aggregated_once(he_restart_run):
    fed, _, _, _, _, _ = he_restart_run
    store = fed.store()
    records = store.round_records()
    store.close()
    assert [r["server_round"] for r in records] == [1, 2, 3]
    for record in records:
        assert record["accepted"] == fed.sites
        assert record["rejected"] == {}


def test_coordinator_state_has_no_model(he_restart_run):
    fed, _, _, _, _, _ = he_restart_run
    assert not read_key_file(fed.root / "coordinator.ctx").has_secret_key
    folder = fed.state_dir / "models"
    for version in range(1, ROUNDS + 1):
        data = (folder / f"model-{version:04d}.safetensors").read_bytes()
        assert is_encrypted(params_from_bytes(data)), version
    store = fed.store()
    latest = store.latest_model()
    store.close()
    assert latest is not None
    assert latest.strategy_arrays is None
    state = json.loads(latest.strategy_state)
    assert sorted(state) == ["key_id", "layout"]
    assert state["layout"]["names"] == ["linear.weight", "linear.bias"]

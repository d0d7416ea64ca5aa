"""A coordinator killed mid-round and restarted; an upload cut by a failing proxy.

Four sites run three rounds of SCAFFOLD: Cleveland as a real process, the
others as agents in this process. VA Long Beach goes
through an HTTP CONNECT proxy (``HTTPS_PROXY``) and uploads in 64-byte chunks.
In round 1 the proxy cuts one of its chunk requests halfway. In round 2, once
the other three updates are accepted and VA Long Beach has sent two chunks,
the coordinator is killed with SIGKILL and started again. The final model
must equal an uninterrupted run, which is the simulation's (the parity test
shows that an uninterrupted deployed run equals it bit for bit).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import numpy as np
import pytest
from deploy_harness import Federation, start_proxy, stop, wait_until

ROUNDS, STEPS, LR = 3, 20, 0.01
# SCAFFOLD keeps state on both sides (the coordinator's control variate,
# restored from the round checkpoint, and each site's own) and sends extra
# tensors both ways, so it is the hardest strategy to resume exactly.
STRATEGY = "scaffold"
CHUNK = 64
PROXIED = "VA Long Beach"


class Scenario:
    """The hooks of the proxied site: cut its upload, then kill the coordinator."""

    def __init__(self, fed: Federation, proxy_pid: int) -> None:
        self.fed = fed
        self.proxy_pid = proxy_pid
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.killed_with: list[str] = []
        self.cut_done = False
        self.restart_done = False

    def __call__(self, name: str, details: dict[str, Any]) -> None:
        self.events.append((name, dict(details)))
        if name != "chunk" or details["offset"] < 2 * CHUNK:
            return
        if details["round"] == 1 and not self.cut_done:
            self.cut_done = True
            os.kill(self.proxy_pid, signal.SIGUSR1)
            log = self.fed.root / "proxy.jsonl"
            wait_until(lambda: '"armed"' in log.read_text(), 10, "the proxy to arm")
        elif details["round"] == 2 and not self.restart_done:
            self.restart_done = True
            self.kill_and_restart()

    def kill_and_restart(self) -> None:
        store = self.fed.store()
        wait_until(lambda: len(store.accepted_updates(2)) == 3, 60,
                   "three accepted updates in round 2")
        self.killed_with = sorted(store.accepted_updates(2))
        store.close()
        stop(self.fed.coordinator, signal.SIGKILL)
        self.fed.start_coordinator()
        self.events.append(("restarted", {}))


@pytest.fixture(scope="module")
def restart_run(tmp_path_factory):
    fed = Federation.create(tmp_path_factory.mktemp("restart"), rounds=ROUNDS,
                            local_steps=STEPS, lr=LR,
                            extra=f'strategy = "{STRATEGY}"')
    proxy, proxy_port, proxy_log = start_proxy(fed)
    threads: list[threading.Thread] = []
    try:
        fed.start_coordinator()
        first_coordinator = fed.coordinator
        fed.start_site("Cleveland")
        scenario = Scenario(fed, proxy.pid)
        proxied = fed.agent(PROXIED, events=scenario, chunk_bytes=CHUNK)
        os.environ["HTTPS_PROXY"] = f"http://127.0.0.1:{proxy_port}"
        try:
            proxied.connect()
        finally:
            del os.environ["HTTPS_PROXY"]
        for site in ("Hungary", "Switzerland"):
            threads.append(threading.Thread(target=fed.agent(site).run, daemon=True))

        def run_proxied() -> None:
            try:
                while proxied.step():
                    pass
            finally:
                assert proxied.client is not None
                proxied.client.close()

        threads.append(threading.Thread(target=run_proxied, daemon=True))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(240)
        code = fed.wait_coordinator()
        yield fed, scenario, code, first_coordinator, proxy_log
    finally:
        fed.close()


def test_restarted_run_equals_uninterrupted_model(restart_run, simulated):
    fed, scenario, code, _, _ = restart_run
    assert scenario.restart_done
    assert code == 0, fed.output("coordinator")[-4000:]
    deployed = fed.final_model()
    for name, value in simulated(ROUNDS, STEPS, LR, STRATEGY).items():
        assert np.array_equal(deployed[name], value), name


def test_coordinator_was_killed_mid_round(restart_run):
    fed, scenario, _, first, _ = restart_run
    assert first.returncode == -signal.SIGKILL
    assert scenario.killed_with == ["Cleveland", "Hungary", "Switzerland"]
    log = fed.log_file.read_text()
    assert "fit round 2/3: resumed (attempt 1) with 3 accepted updates" in log
    assert "coordinator: resuming after round 1 of 3" in log


def test_every_update_aggregated_once(restart_run):
    fed, _, _, _, _ = restart_run
    store = fed.store()
    records = store.round_records()
    store.close()
    assert [r["server_round"] for r in records] == [1, 2, 3]
    for record in records:
        assert record["accepted"] == fed.sites
        assert record["rejected"] == {}


def test_cut_upload_resumed_from_its_offset(restart_run):
    _, scenario, _, _, _ = restart_run
    resumes = [d for name, d in scenario.events if name == "resume"]
    round_one = [d for d in resumes if d["round"] == 1]
    assert round_one, scenario.events
    assert 2 * CHUNK <= round_one[0]["offset"] < 3 * CHUNK


def test_upload_resumed_after_coordinator_restart(restart_run):
    _, scenario, _, _, _ = restart_run
    names = [name for name, _ in scenario.events]
    restarted = names.index("restarted")
    before = [d["offset"] for name, d in scenario.events[:restarted]
              if name == "chunk" and d["round"] == 2]
    after = [d["offset"] for name, d in scenario.events[restarted:]
             if name in ("chunk", "resume") and d["round"] == 2]
    # The chunk at byte 128 went to the restarted coordinator, which had the
    # first two chunks from its disk alone. The agent then either went on with
    # the next chunk or, after an error, resumed at byte 128, never at byte 0.
    assert before == [0, CHUNK, 2 * CHUNK]
    assert after[0] in (2 * CHUNK, 3 * CHUNK)
    assert 0 not in after
    accepted = [d["round"] for name, d in scenario.events if name == "accepted"]
    assert accepted == [1, 2, 3]


def test_proxy_carried_the_site_traffic(restart_run):
    fed, _, _, _, proxy_log = restart_run
    events = [json.loads(line) for line in proxy_log.read_text().splitlines()]
    connects = [e for e in events if e["event"] == "connect"]
    cuts = [e for e in events if e["event"] == "cut"]
    assert {e["target"] for e in connects} == {f"127.0.0.1:{fed.port}"}
    assert len(connects) >= 2
    assert len(cuts) == 1
    assert 0 < cuts[0]["sent"] < cuts[0]["of"]

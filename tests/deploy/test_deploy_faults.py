"""Sites that die or reply late: deadlines, retries and rejected late updates.

Round 1 needs three of four updates. Cleveland and Hungary (agents in this
process) reply at once. Switzerland is a process that kills itself as soon as
it takes its training task. VA Long Beach trains but holds its update until
round 1 has closed. At the first deadline only two updates are in, so the
round is retried; the test then starts Switzerland again, in a new process
that reads the key the first one kept, and it picks its task up again. Round
1 closes at the second deadline with three updates; VA Long Beach's late
update is rejected and it takes part in round 2 as usual.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from deploy_harness import Federation, child_env, wait_until

from prifed.core.params import params_from_bytes
from prifed.deploy import wire

DEADLINE = 4.0
LATE = "VA Long Beach"
DYING = "Switzerland"


class LateSite:
    """Holds VA Long Beach's round-1 update until the round has closed."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, details: dict[str, Any]) -> None:
        self.events.append((name, dict(details)))
        if name == "trained" and details["round"] == 1:
            store = self.fed.store()
            wait_until(lambda: store.round_row(1)["status"] != "open", 90,
                       "round 1 to close")
            store.close()


def _script(fed: Federation, mode: str, gate: Path | None = None
            ) -> subprocess.Popen[bytes]:
    output = open(fed.root / f"{DYING}-{mode}.out", "ab")
    fed.logs.append(output)
    args = [sys.executable, str(Path(__file__).with_name("deploy_site_script.py")),
            mode, fed.url, str(fed.ca_file), DYING, str(fed.site_dir(DYING)),
            str(fed.token_file(DYING))]
    process = subprocess.Popen(args + ([str(gate)] if gate else []),
                               env=child_env(), stdout=output,
                               stderr=subprocess.STDOUT)
    fed.processes.append(process)
    return process


@pytest.fixture(scope="module")
def faults_run(tmp_path_factory):
    fed = Federation.create(tmp_path_factory.mktemp("faults"), rounds=2,
                            local_steps=20, lr=0.01, deadline=DEADLINE,
                            min_sites=3, attempts=4, keep_updates=True)
    threads = []
    gate = fed.root / "revive-now"
    try:
        fed.start_coordinator()
        dying = _script(fed, "die")
        revived = _script(fed, "gated", gate)
        late = LateSite(fed)
        for agent in (fed.agent("Cleveland"), fed.agent("Hungary"),
                      fed.agent(LATE, events=late)):
            threads.append(threading.Thread(target=agent.run, daemon=True))
            threads[-1].start()
        dying.wait(120)
        store = fed.store()
        wait_until(lambda: (store.round_row(1) or {}).get("attempt", 1) >= 2, 60,
                   "round 1 to be retried")
        store.close()
        gate.touch()
        code = fed.wait_coordinator()
        for thread in threads:
            thread.join(60)
        revived.wait(60)
        yield fed, late, code, dying, revived
    finally:
        fed.close()


def _round(fed: Federation, number: int) -> tuple[dict[str, Any], dict[str, Any]]:
    store = fed.store()
    row = store.round_row(number)
    store.close()
    return row, row["record"]


def test_run_finishes_despite_dead_site(faults_run):
    fed, _, code, dying, _ = faults_run
    assert dying.returncode == -signal.SIGKILL
    assert code == 0, fed.output("coordinator")[-4000:]
    assert (fed.state_dir / "final_model.safetensors").exists()


def test_round_below_minimum_is_retried(faults_run):
    fed, _, _, _, _ = faults_run
    row, _ = _round(fed, 1)
    assert row["attempt"] >= 2
    assert row["closed_at"] - row["opened_at"] >= row["attempt"] * DEADLINE - 0.5
    assert "fit round 1/2: 2 of 4 updates by the deadline, minimum 3; retrying " \
           "(attempt 2/4" in fed.log_file.read_text()


def test_round_closes_with_the_sites_that_replied(faults_run):
    fed, _, _, _, _ = faults_run
    row, record = _round(fed, 1)
    assert record["accepted"] == ["Cleveland", "Hungary", DYING]
    assert list(record["failures"]) == [LATE]
    assert record["failures"][LATE] == (
        f"no reply before the deadline ({DEADLINE:g} s, attempt "
        f"{row['attempt']}/4)")


def test_restarted_site_got_its_task_again(faults_run):
    fed, _, _, _, revived = faults_run
    assert revived.returncode == 0
    store = fed.store()
    updates = store.accepted_updates(1)
    store.close()
    assert DYING in updates
    # The dead process joined with the token; the new one used the saved key.
    output = fed.output(f"{DYING}-gated")
    assert "site Switzerland: connected to federation test-fed" in output
    assert "joined federation" not in output


def test_late_update_rejected_cleanly(faults_run):
    fed, late, _, _, _ = faults_run
    rejected = [d for name, d in late.events if name == "rejected"]
    assert len(rejected) == 1
    assert rejected[0]["round"] == 1
    assert rejected[0]["code"] == "round_closed"
    assert "round 1" in rejected[0]["detail"]
    assert f"site {LATE!r}: HTTP 409 round_closed" in fed.log_file.read_text()


def test_late_site_takes_part_in_next_round(faults_run):
    fed, late, _, _, _ = faults_run
    _, record = _round(fed, 2)
    assert record["accepted"] == fed.sites
    accepted = [d["round"] for name, d in late.events if name == "accepted"]
    assert accepted == [2]


def test_round_model_is_mean_of_accepted_updates(faults_run):
    fed, _, _, _, _ = faults_run
    _, record = _round(fed, 1)
    store = fed.store()
    updates = store.accepted_updates(1)
    store.close()
    assert sorted(updates) == sorted(record["accepted"])
    pairs = []
    for update in updates.values():
        tensors, _ = wire.decode_tensors(update.path.read_bytes(), 1 << 20, "update")
        pairs.append((tensors, float(update.num_samples)))
    model = params_from_bytes((fed.state_dir / "models" / "model-0001.safetensors")
                              .read_bytes())
    weights = np.array([w for _, w in pairs])
    for name, value in model.items():
        stacked = np.stack([p[name].astype(np.float64) for p, _ in pairs])
        independent = np.tensordot(weights, stacked, axes=1) / weights.sum()
        np.testing.assert_allclose(value, independent, rtol=1e-6, atol=1e-7)
        assert value.dtype == np.float32

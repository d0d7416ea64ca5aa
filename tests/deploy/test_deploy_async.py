"""FedBuff deployed: asynchronous tasks, a slow site, and a coordinator killed mid-run.

Four heart sites train with ``strategy = "fedbuff"`` and a buffer of two:
Cleveland as a real process, the others as agents in this process. VA Long
Beach is slow (it waits before every training task), so the fast sites must
not wait for it. After Hungary's second accepted update the coordinator is
killed with SIGKILL and started again. Updates are kept on disk, so the test
can rebuild every model version from the updates its record names, with
FedBuff's own buffer, and compare bit for bit.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest
from deploy_harness import Federation, child_env, stop, wait_until

from prifed.core.messages import TrainReply
from prifed.core.params import params_from_bytes
from prifed.deploy import wire
from prifed.deploy.buffered import load_records
from prifed.strategies.base import stepped_names
from prifed.strategies.fedbuff import UpdateBuffer

ROUNDS, STEPS, LR, BUFFER = 3, 20, 0.05, 2
SLOW, SLOW_SECONDS = "VA Long Beach", 2.5
EXTRA = f'strategy = "fedbuff"\nstrategy_options = {{ buffer_size = {BUFFER} }}'


class KillAfterSecondUpdate:
    """Hungary's event hook: kill and restart the coordinator once, mid-run."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.accepted = 0
        self.restarted = False
        self.first: Any = None
        self.crashes: dict[str, BaseException] = {}

    def __call__(self, name: str, details: dict[str, Any]) -> None:
        if name != "accepted" or self.restarted:
            return
        self.accepted += 1
        if self.accepted == 2:
            self.restarted = True
            self.first = self.fed.coordinator
            stop(self.fed.coordinator, signal.SIGKILL)
            self.fed.start_coordinator()


def slow_down(name: str, details: dict[str, Any]) -> None:
    if name == "task" and details.get("kind") == "train":
        time.sleep(SLOW_SECONDS)


@pytest.fixture(scope="module")
def async_run(tmp_path_factory):
    fed = Federation.create(tmp_path_factory.mktemp("async"), rounds=ROUNDS,
                            local_steps=STEPS, lr=LR, extra=EXTRA, keep_updates=True)
    try:
        fed.start_coordinator()
        fed.start_site("Cleveland")
        killer = KillAfterSecondUpdate(fed)
        hooks = {"Hungary": killer, SLOW: slow_down}
        crashes: dict[str, BaseException] = {}

        def run_agent(site: str) -> None:
            try:
                fed.agent(site, events=hooks.get(site)).run()
            except BaseException as error:  # noqa: BLE001 - the test reads it
                crashes[site] = error

        threads = [threading.Thread(target=run_agent, args=(site,), daemon=True)
                   for site in ("Hungary", "Switzerland", SLOW)]
        for thread in threads:
            thread.start()
        wait_until(lambda: killer.restarted, 120, "the coordinator restart")
        for thread in threads:
            thread.join(240)
        code = fed.wait_coordinator()
        killer.crashes = crashes
        yield fed, killer, code
    finally:
        fed.close()


def test_run_ends_at_task_budget(async_run):
    fed, killer, code = async_run
    assert killer.restarted
    assert killer.first.returncode == -signal.SIGKILL
    assert code == 0, fed.output("coordinator")[-4000:]
    summary = wire_summary(fed)
    assert summary["mode"] == "asynchronous"
    records = summary["rounds"]
    final = records[-1]
    assert final["final"] is True
    assert final["tasks_done"] == ROUNDS * len(fed.sites)
    assert set(final["eval_metrics"]) == set(fed.sites)
    assert summary["final"]["mean_accuracy"] > 0.6
    log = fed.log_file.read_text()
    assert "async: resuming with" in log
    # Every site went on through the restart: no agent crashed and no task
    # had to wait out its deadline.
    assert killer.crashes == {}
    assert "no reply before the deadline" not in log


def test_status_reports_task_progress(async_run):
    fed, _, _ = async_run
    status_output = subprocess.run(
        [sys.executable, "-m", "prifed.cli", "ca", "status", "--config",
         str(fed.root / "federation.toml")], capture_output=True, text=True,
        env=child_env(), timeout=60, check=True).stdout
    versions = len([r for r in wire_summary(fed)["rounds"] if not r.get("final")])
    budget = ROUNDS * len(fed.sites)
    assert (f"asynchronous run: {budget} of {budget} tasks done, model version "
            f"{versions}, 0 tasks open") in status_output


def test_versions_rebuild_from_updates(async_run):
    fed, _, _ = async_run
    store = fed.store()
    records = [r for r in load_records(store) if not r.get("final")]
    trainable = store.get_meta("trainable")
    store.close()
    assert [r["version"] for r in records] == list(range(1, len(records) + 1))
    models = fed.state_dir / "models"
    for record in records:
        previous = params_from_bytes(
            (models / f"model-{record['version'] - 1:04d}.safetensors").read_bytes())
        buffer = UpdateBuffer(previous, stepped_names(previous, trainable))
        assert len(record["updates"]) == BUFFER
        for update in record["updates"]:
            assert update["staleness"] == record["version"] - 1 - update["version"]
            base = params_from_bytes(
                (models / f"model-{update['version']:04d}.safetensors").read_bytes())
            position = fed.sites.index(update["site"])
            path = (fed.state_dir / "updates" / f"round-{update['task']:04d}"
                    / f"site-{position:03d}.safetensors.zst")
            tensors, metadata = wire.decode_tensors(path.read_bytes(), 1 << 30, "u")
            assert metadata["round"] == str(update["task"])
            params, _ = wire.split_update(tensors, list(previous))
            reply = TrainReply(update["site"], update["version"], params,
                               update["num_samples"])
            buffer.add(reply, base, update["staleness"],
                       (1.0 + update["staleness"]) ** -0.5)
        rebuilt = buffer.apply(previous, 1.0)
        stored = params_from_bytes(
            (models / f"model-{record['version']:04d}.safetensors").read_bytes())
        for name, value in rebuilt.items():
            assert np.array_equal(value, stored[name]), (record["version"], name)


def test_sites_evaluate_every_version(async_run):
    fed, _, _ = async_run
    records = wire_summary(fed)["rounds"]
    for record in records:
        assert sorted(record["eval_metrics"]) == sorted(fed.sites), record["version"]
    log = fed.log_file.read_text()
    assert f"async: model version {records[-1]['version']} has mean accuracy" in log


def test_no_task_aggregated_twice(async_run):
    fed, _, _ = async_run
    store = fed.store()
    records = [r for r in load_records(store) if not r.get("final")]
    store.close()
    tasks = [u["task"] for r in records for u in r["updates"]]
    assert len(tasks) == len(set(tasks))
    assert len(tasks) <= ROUNDS * len(fed.sites)


def test_slow_site_does_not_delay_others(async_run):
    fed, _, _ = async_run
    store = fed.store()
    records = [r for r in load_records(store) if not r.get("final")]
    store.close()
    counts = Counter(u["site"] for r in records for u in r["updates"])
    fast = [counts[s] for s in fed.sites if s != SLOW]
    assert counts[SLOW] < max(fast), counts
    stale = [u["staleness"] for r in records for u in r["updates"]]
    assert max(stale) >= 1


def wire_summary(fed: Federation) -> dict[str, Any]:
    return json.loads((fed.state_dir / "summary.json").read_text())

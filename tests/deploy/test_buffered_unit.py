"""The asynchronous driver against the network transport, without HTTP.

The test plays the sites. It takes their tasks off the task board and
uploads through the transport methods that the HTTP handlers call, in an
order it chooses. Every model version is then checked against FedBuff's
formula, worked out here by hand.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from prifed.deploy import wire
from prifed.deploy.buffered import BufferedRun, load_records
from prifed.deploy.config import parse_config
from prifed.deploy.errors import RequestRejected, ServiceStopped
from prifed.deploy.store import Store
from prifed.deploy.transport import ModelShelf, NetworkTransport, TaskBoard
from prifed.strategies import build_strategy

INITIAL = {"w": np.array([1.0, 2.0, 3.0], np.float32), "b": np.zeros(1, np.float32)}
NORM = {"w": np.array([1.0, -1.0], np.float32),
        "running_mean": np.array([0.0, 4.0], np.float32),
        "num_batches_tracked": np.array(10, np.int64)}
"""A model with batch-norm buffers: only ``w`` is trainable."""


class Harness:
    """A coordinator's store, transport and asynchronous driver in one process."""

    def __init__(self, root: Path, sites: list[str], rounds: int, buffer_size: int,
                 deadline: float = 60.0, joined: bool = False,
                 initial: dict[str, np.ndarray] | None = None,
                 trainable: list[str] | None = None) -> None:
        self.initial = INITIAL if initial is None else initial
        self.trainable = list(self.initial) if trainable is None else trainable
        self.config = parse_config({
            "federation": {"name": "unit", "sites": sites},
            "training": {"strategy": "fedbuff", "rounds": rounds,
                         "strategy_options": {"buffer_size": buffer_size}},
            "rounds": {"deadline_seconds": deadline,
                       "evaluate_deadline_seconds": 1.0},
            "coordinator": {"state_dir": "state", "keep_updates": True}}, root)
        self.sites = sites
        self.store = Store(self.config.database_url, self.config.state_dir)
        self.store.sync_roster(sites)
        for site in sites if joined else []:
            # Only joined sites are asked to evaluate a model version.
            self.store.add_token(site, f"token-{site}", 60)
            self.store.redeem_token(site, f"token-{site}", bytes(32))
        self.board = TaskBoard()
        self.models = ModelShelf(self.config.state_dir / "models", {})
        self.transport = NetworkTransport(self.store, self.config, self.board,
                                          self.models)
        self.models.publish(0, self.initial)
        self.store.set_meta("param_names", list(self.initial))
        self.strategy = build_strategy("fedbuff", buffer_size=buffer_size,
                                       local_config={"local_steps": 1})
        self.run = BufferedRun(self.config, self.store, self.transport, self.models,
                               self.strategy)
        self.result: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, daemon=True)

    def _work(self) -> None:
        try:
            self.result = self.run.run(self.initial, self.trainable)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error

    def start(self) -> Harness:
        self.thread.start()
        return self

    def task(self, site: str, after: int = 0, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for the site's training task numbered above ``after``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.board.next_task(site)
            if task is not None and task["kind"] == "train" and task["round"] > after:
                return task
            time.sleep(0.01)
        raise AssertionError(f"no task for {site} after task {after}: {self.error}")

    def next_of_kind(self, site: str, kind: str, timeout: float = 10.0
                     ) -> dict[str, Any]:
        """Wait until the site's next task is of ``kind``; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.board.next_task(site)
            if task is not None and task["kind"] == kind:
                return task
            time.sleep(0.01)
        raise AssertionError(f"no {kind} task for {site}: {self.error}")

    def upload(self, site: str, task: dict[str, Any], shift: float,
               num_samples: int = 10, value: float | None = None) -> None:
        """Upload the task's model plus ``shift``, or with every value ``value``."""
        base = self.models.load(task["model_version"])
        params = {n: (v + v.dtype.type(shift) if value is None
                      else np.full_like(v, value)) for n, v in base.items()}
        payload = wire.encode_update(params, {}, site, task["round"])
        body = wire.UploadBody(size=len(payload),
                               sha256=hashlib.sha256(payload).hexdigest(),
                               num_samples=num_samples)
        status = self.transport.start_upload(site, task["round"], body)
        self.transport.part_path(status["upload"]).write_bytes(payload)
        self.transport.commit_upload(site, status["upload"])

    def drain(self, timeout: float = 20.0) -> dict[str, np.ndarray]:
        """Upload every open task, shifted by 1, until the run finishes."""
        deadline = time.monotonic() + timeout
        while self.thread.is_alive() and time.monotonic() < deadline:
            for site in self.sites:
                task = self.board.next_task(site)
                if task is not None and task["kind"] == "train":
                    try:
                        self.upload(site, task, shift=1.0)
                    except RequestRejected:
                        # The task expired, or the budget was spent meanwhile.
                        pass
            time.sleep(0.01)
        return self.finish()

    def finish(self, timeout: float = 20.0) -> dict[str, np.ndarray]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the driver did not finish"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def close(self) -> None:
        self.transport.stop()
        self.thread.join(10)
        self.store.close()


@pytest.fixture
def harness(tmp_path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(*args: Any, **kwargs: Any) -> Harness:
        made.append(Harness(tmp_path, *args, **kwargs).start())
        return made[-1]

    yield make
    for item in made:
        item.close()


def test_versions_follow_fedbuff_by_hand(harness):
    run = harness(["A", "B"], rounds=2, buffer_size=2)
    a1, b2 = run.task("A"), run.task("B")
    assert (a1["round"], b2["round"]) == (1, 2)
    assert a1["model_version"] == b2["model_version"] == 0
    run.upload("A", a1, shift=1.0)
    a3 = run.task("A", after=1)
    assert a3["model_version"] == 0
    run.upload("A", a3, shift=3.0)
    a4 = run.task("A", after=3)
    assert a4["model_version"] == 1
    run.upload("B", b2, shift=2.0, num_samples=30)
    run.upload("A", a4, shift=4.0)
    final = run.finish()

    v0 = {n: v.astype(np.float64) for n, v in INITIAL.items()}
    v1 = {n: v + (10 * 1.0 + 10 * 3.0) / 20 for n, v in v0.items()}
    weight = 2 ** -0.5  # B's task was on version 0 when version 1 was current
    v2 = {n: v1[n] + (weight * 30 * 2.0 + 10 * 4.0) / 40 for n in v0}
    for name in INITIAL:
        np.testing.assert_allclose(run.models.load(1)[name], v1[name], rtol=1e-6)
        np.testing.assert_allclose(final[name], v2[name], rtol=1e-6)
        assert final[name].dtype == np.float32
    records = load_records(run.store)
    assert [r["version"] for r in records] == [1, 2, 2]
    assert [[u["staleness"] for u in r["updates"]] for r in records[:2]] == \
        [[0, 0], [1, 0]]
    assert records[-1]["final"]
    assert records[-1]["tasks_done"] == 4
    # The budget of four tasks is spent, so no site got a fifth task.
    assert sorted(u["task"] for r in records for u in r["updates"]) == [1, 2, 3, 4]
    assert run.board.next_task("A") is None
    assert run.board.next_task("B") is None


def test_joined_sites_evaluate_each_version(harness):
    run = harness(["A"], rounds=2, buffer_size=1, joined=True)
    run.upload("A", run.task("A"), shift=1.0)
    evaluation = run.next_of_kind("A", "evaluate")
    assert evaluation["model_version"] == 1
    run.transport.submit_evaluation("A", 1, wire.EvaluationBody(
        num_samples=5, metrics={"accuracy": 0.5}))
    run.upload("A", run.task("A", after=1), shift=1.0)
    evaluation = run.next_of_kind("A", "evaluate")
    assert evaluation["model_version"] == 2
    run.transport.submit_evaluation("A", 2, wire.EvaluationBody(
        num_samples=5, metrics={"accuracy": 0.75}))
    run.finish()
    records = load_records(run.store)
    assert [r["eval_metrics"]["A"]["accuracy"] for r in records] == [0.5, 0.75, 0.75]
    assert records[-1]["final"]


def test_batch_norm_buffers_averaged_not_stepped(harness):
    run = harness(["A", "B"], rounds=1, buffer_size=2, initial=NORM,
                  trainable=["w"])
    a, b = run.task("A"), run.task("B")
    run.upload("A", a, shift=2.0, num_samples=10)
    run.upload("B", b, shift=4.0, num_samples=30)
    final = run.finish()
    # Both updates are fresh: the trainable tensor moves by the sample-weighted
    # change, and each buffer becomes the weighted mean of the sites' values.
    np.testing.assert_allclose(final["w"], NORM["w"] + (10 * 2 + 30 * 4) / 40)
    np.testing.assert_allclose(final["running_mean"],
                               NORM["running_mean"] + (10 * 2 + 30 * 4) / 40)
    assert final["running_mean"].dtype == np.float32
    assert final["num_batches_tracked"].dtype == np.int64
    assert final["num_batches_tracked"].shape == ()
    assert int(final["num_batches_tracked"]) == 10 + round((10 * 2 + 30 * 4) / 40)


def test_late_task_expires_and_redispatches(harness):
    run = harness(["A", "B"], rounds=3, buffer_size=1, deadline=1.0)
    a1 = run.task("A")
    b = run.task("B")
    run.upload("B", b, shift=1.0)
    b = run.task("B", after=b["round"])
    run.upload("B", b, shift=1.0)
    fresh = run.task("A", after=a1["round"], timeout=5.0)
    assert fresh["model_version"] >= 1
    with pytest.raises(RequestRejected) as caught:
        run.upload("A", a1, shift=5.0)
    assert caught.value.status == 409
    assert caught.value.code == "round_closed"
    run.drain()
    records = load_records(run.store)
    tasks = [u["task"] for r in records for u in r["updates"]]
    assert a1["round"] not in tasks
    assert fresh["round"] in tasks
    assert records[-1]["tasks_done"] == 6


def test_nan_update_keeps_task_open(harness):
    run = harness(["A"], rounds=1, buffer_size=1)
    task = run.task("A")
    with pytest.raises(RequestRejected) as caught:
        run.upload("A", task, shift=0.0, value=float("nan"))
    assert caught.value.status == 422
    assert "not finite" in caught.value.detail or "NaN" in caught.value.detail
    assert run.strategy.version == 0
    assert run.run.state.ended == 0
    run.upload("A", task, shift=2.0)
    final = run.finish()
    np.testing.assert_allclose(final["w"], INITIAL["w"] + 2.0)


def test_reported_failure_ends_task(harness):
    run = harness(["A", "B"], rounds=1, buffer_size=1)
    a, b = run.task("A"), run.task("B")
    run.transport.report_failure("A", a["round"], "privacy budget spent")
    run.upload("B", b, shift=1.0)
    final = run.finish()
    np.testing.assert_allclose(final["w"], INITIAL["w"] + 1.0)
    records = load_records(run.store)
    assert [u["site"] for r in records for u in r["updates"]] == ["B"]


def test_restart_resubmits_accepted_update(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="prifed")
    first = Harness(tmp_path, ["A", "B"], rounds=1, buffer_size=2).start()
    a, b = first.task("A"), first.task("B")
    first.transport.stop()   # the driver stops; the HTTP side still accepts
    first.thread.join(10)
    assert isinstance(first.error, ServiceStopped)
    first.upload("A", a, shift=1.0)
    first.store.close()

    second = Harness(tmp_path, ["A", "B"], rounds=1, buffer_size=2).start()
    try:
        again = second.task("B")
        assert again["round"] == b["round"]
        second.upload("B", again, shift=3.0)
        final = second.finish()
    finally:
        second.close()
    np.testing.assert_allclose(final["w"], INITIAL["w"] + 2.0)
    assert "async: resuming with 2 open tasks at model version 0" in caplog.text
    assert "async task 1: update from site A, staleness 0" in caplog.text

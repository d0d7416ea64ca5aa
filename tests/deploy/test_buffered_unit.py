"""The asynchronous driver against the network transport, without HTTP.

The test plays the sites (see ``buffered_harness``), so every model version
can be checked against FedBuff's formula, worked out here by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from buffered_harness import INITIAL, Harness

from prifed.deploy import wire
from prifed.deploy.buffered import load_records
from prifed.deploy.errors import RequestRejected, ServiceStopped

NORM = {"w": np.array([1.0, -1.0], np.float32),
        "running_mean": np.array([0.0, 4.0], np.float32),
        "num_batches_tracked": np.array(10, np.int64)}
"""A model with batch-norm buffers: only ``w`` is trainable."""


@pytest.fixture
def harness(tmp_path) -> Iterator[Callable[..., Harness]]:
    harnesses: list[Harness] = []

    def make(*args: Any, **kwargs: Any) -> Harness:
        harnesses.append(Harness(tmp_path, *args, **kwargs).start())
        return harnesses[-1]

    yield make
    for item in harnesses:
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

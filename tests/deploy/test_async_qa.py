"""Defects of the asynchronous (FedBuff) coordinator found in QA, as regressions.

Each test drives the store, transport and asynchronous driver in one process,
without HTTP, and plays the sites itself (see ``buffered_harness``).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from buffered_harness import INITIAL, Harness

from prifed.deploy import wire
from prifed.deploy.buffered import load_records
from prifed.deploy.config import parse_config
from prifed.deploy.errors import RequestRejected
from prifed.deploy.store import Store
from prifed.errors import ConfigError, PriFedError


class Crash(BaseException):
    """Stands in for a SIGKILL of the coordinator at a chosen line."""


@pytest.fixture
def driver(tmp_path) -> Iterator[Callable[..., Harness]]:
    drivers: list[Harness] = []

    def make(*args: Any, start: bool = True, **kwargs: Any) -> Harness:
        drivers.append(Harness(tmp_path, *args, **kwargs))
        return drivers[-1].start() if start else drivers[-1]

    yield make
    for item in drivers:
        item.close()


def _crash(*args: Any, **kwargs: Any) -> None:
    raise Crash("simulated kill")


def test_buffer_over_budget_rejected(tmp_path):
    # Two sites, one round: the budget is 2 tasks, so a buffer of 5 never
    # fills and the run ends with the initial model as its "final" model.
    raw = {"federation": {"name": "qa", "sites": ["A", "B"]},
           "training": {"strategy": "fedbuff", "rounds": 1,
                        "strategy_options": {"buffer_size": 5}}}
    with pytest.raises(ConfigError, match="buffer_size"):
        parse_config(raw, tmp_path)


def test_failing_site_left_out_after_attempts(driver):
    run = driver(["A", "B"], rounds=3, buffer_size=1, attempts=2)
    first = run.task("A")
    run.transport.report_failure("A", first["round"], "privacy budget spent")
    failed_at = time.monotonic()
    second = run.task("A", after=first["round"], timeout=5.0)
    # After one failure the site waits a second before its next task.
    assert time.monotonic() - failed_at >= 0.9
    run.transport.report_failure("A", second["round"], "privacy budget spent")
    done = 0
    while run.thread.is_alive() and done < 10:
        task = run.board.next_task("B")
        if task is not None and task["kind"] == "train":
            run.upload("B", task)
            done += 1
        assert run.board.next_task("A") is None
        time.sleep(0.01)
    run.thread.join(10)
    assert run.error is None
    records = load_records(run.store)
    dropped = [d for r in records for d in r["dropped"]]
    assert [(d["site"], d["task"]) for d in dropped] == \
        [("A", first["round"]), ("A", second["round"])]
    assert dropped[0]["reason"] == "site reported: privacy budget spent"
    assert records[-1]["left_out"] == ["A"]
    # A's two failures count against the six tasks, and B did the other four.
    assert done == 4
    assert records[-1]["tasks_done"] == 6


def test_revoked_site_task_ends_at_once(driver):
    run = driver(["A", "B", "C"], rounds=1, buffer_size=1, deadline=60.0)
    a, b = run.task("A"), run.task("B")
    run.task("C")
    run.store.revoke("C")
    run.upload("A", a)
    run.upload("B", b)
    run.thread.join(5.0)
    assert not run.thread.is_alive(), "the run waits for the revoked site's task"


def test_no_site_left_stops_run(driver):
    run = driver(["A"], rounds=2, buffer_size=1, deadline=0.5)
    run.task("A")
    run.store.revoke("A")
    run.thread.join(6.0)
    assert not run.thread.is_alive(), "the driver still waits for a site to return"
    assert isinstance(run.error, PriFedError)
    assert "no site can take a task (1 of 2 tasks done)" in str(run.error)


def test_unknown_task_error_names_own_task(driver):
    run = driver(["A", "B"], rounds=2, buffer_size=2)
    a, b = run.task("A"), run.task("B")
    assert a["round"] < b["round"]
    with pytest.raises(RequestRejected) as caught:
        run.upload("B", {"round": 99, "model_version": 0})
    assert caught.value.status == 409
    assert caught.value.code == "wrong_round"
    assert caught.value.detail == \
        f"task 99 is not open; site 'B' has task {b['round']} open"


def test_late_upload_after_restart_closed(driver):
    first = driver(["A", "B"], rounds=1, buffer_size=2)
    first.run._evaluate_final = _crash
    a, b = first.task("A"), first.task("B")
    first.upload("A", a)
    first.upload("B", b)
    first.thread.join(10)
    assert isinstance(first.error, Crash)
    first.transport.stop()
    first.store.close()

    second = driver(["A", "B"], rounds=1, buffer_size=2)
    # Until the driver has reopened its tasks an upload gets 503 "not_ready",
    # which agents retry.
    deadline = time.monotonic() + 10
    while True:
        with pytest.raises(RequestRejected) as caught:
            second.upload("A", a)
        if caught.value.status != 503 or time.monotonic() > deadline:
            break
        assert caught.value.code == "not_ready"
        time.sleep(0.05)
    assert caught.value.status == 409
    assert caught.value.code == "round_closed", caught.value.detail


def test_kill_before_close_drops_update(driver, tmp_path):
    first = driver(["A", "B"], rounds=1, buffer_size=2, keep_updates=False,
                   start=False)
    first.transport.close_task = _crash
    first.start()
    a, b = first.task("A"), first.task("B")
    first.upload("A", a)
    first.thread.join(10)
    assert isinstance(first.error, Crash)
    first.transport.stop()
    first.store.close()

    second = driver(["A", "B"], rounds=1, buffer_size=2, keep_updates=False)
    again = second.task("B")
    assert again["round"] == b["round"]
    second.upload("B", again)
    second.thread.join(10)
    assert second.error is None
    assert not second.thread.is_alive()
    left = sorted(p.name for p in (tmp_path / "state" / "updates").rglob("*.zst"))
    assert left == [], "updates of ended tasks stay on disk with keep_updates off"
    assert {r["status"] for r in second.store.rounds()} == {"closed"}


def test_join_retry_same_key_accepted(tmp_path):
    # A coordinator killed after committing a join but before replying makes
    # the agent send the same join again; today the site is locked out.
    store = Store(f"sqlite:///{tmp_path / 'c.db'}", tmp_path)
    try:
        store.sync_roster(["A"])
        digest = hashlib.sha256(b"token-a").hexdigest()
        store.add_token("A", digest, 3600)
        key = bytes(range(32))
        store.redeem_token("A", digest, key)
        with pytest.raises(RequestRejected) as caught:
            store.redeem_token("A", digest, bytes(32))
        assert caught.value.status == 401
        store.redeem_token("A", digest, key)
        assert store.site("A").public_key == key
    finally:
        store.close()


def test_restart_brings_back_left_out_site(driver):
    first = driver(["A"], rounds=2, buffer_size=1, attempts=1)
    task = first.task("A")
    first.transport.report_failure("A", task["round"], "out of memory")
    first.thread.join(10)
    assert isinstance(first.error, PriFedError)
    assert "no site can take a task (1 of 2 tasks done)" in str(first.error)
    first.transport.stop()
    first.store.close()

    second = driver(["A"], rounds=2, buffer_size=1, attempts=1)
    again = second.task("A", after=task["round"])
    second.upload("A", again)
    second.thread.join(10)
    assert second.error is None
    records = load_records(second.store)
    assert [u["site"] for r in records for u in r["updates"]] == ["A"]
    assert records[-1]["tasks_done"] == 2


def test_unapplied_update_listed_at_end(driver):
    run = driver(["A", "B", "C"], rounds=1, buffer_size=2)
    tasks = {site: run.task(site) for site in ("A", "B", "C")}
    for site in ("A", "B", "C"):
        run.upload(site, tasks[site])
    run.thread.join(10)
    assert run.error is None
    records = load_records(run.store)
    # Three tasks and a buffer of two: one version, and C's update is left over.
    assert [r["version"] for r in records] == [1, 1]
    assert [u["site"] for u in records[-1]["unapplied"]] == ["C"]
    assert records[-1]["unapplied"][0]["task"] == tasks["C"]["round"]


def test_commit_retried_after_accept(driver):
    # The agent resends a commit whose reply it lost; by then the update is
    # in, its task closed and its upload row deleted.
    run = driver(["A"], rounds=2, buffer_size=1)
    first = run.task("A")
    upload = run.upload("A", first)
    run.task("A", after=first["round"])
    assert run.transport.commit_upload("A", upload) == {
        "status": "accepted", "round": first["round"]}
    with pytest.raises(RequestRejected) as caught:
        run.transport.commit_upload("A", "0" * 32)
    assert caught.value.code == "unknown_upload"


def test_concurrent_commits_both_accepted(driver, monkeypatch):
    # An agent whose commit timed out sends it again while the first is still
    # being checked; both must hear "accepted" and the update count once.
    run = driver(["A"], rounds=2, buffer_size=1)
    task = run.task("A")
    check = run.transport._validate_payload

    def slow_check(*args: Any) -> None:
        time.sleep(0.5)
        check(*args)

    monkeypatch.setattr(run.transport, "_validate_payload", slow_check)
    payload = wire.encode_update({n: v + 1 for n, v in INITIAL.items()}, {}, "A",
                                 task["round"])
    body = wire.UploadBody(size=len(payload),
                           sha256=hashlib.sha256(payload).hexdigest(),
                           num_samples=10)
    upload = run.transport.start_upload("A", task["round"], body)["upload"]
    run.transport.part_path(upload).write_bytes(payload)
    answers: list[Any] = []

    def commit() -> None:
        try:
            answers.append(run.transport.commit_upload("A", upload))
        except Exception as error:  # noqa: BLE001 - the test reads it
            answers.append(error)

    threads = [threading.Thread(target=commit) for _ in range(2)]
    threads[0].start()
    time.sleep(0.2)
    threads[1].start()
    for thread in threads:
        thread.join(10)
    assert answers == [{"status": "accepted", "round": task["round"]}] * 2
    store = run.store
    assert list(store.accepted_updates(task["round"])) == ["A"]

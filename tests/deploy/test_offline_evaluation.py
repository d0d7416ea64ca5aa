"""Evaluation does not wait for a joined site that has gone quiet."""

from __future__ import annotations

import re
import threading
import time

import numpy as np

from prifed.core.messages import EvaluateReply, Failure
from prifed.deploy import wire
from prifed.deploy.config import parse_config
from prifed.deploy.store import SiteRow, Store
from prifed.deploy.transport import ModelShelf, NetworkTransport, TaskBoard

MODEL = {"w": np.ones(3, np.float32)}


def evaluate_with(tmp_path, last_seen_ago: float, serving_for: float,
                  b_replies: bool) -> tuple[list, float]:
    """Evaluate with A replying at once and B last heard ``last_seen_ago`` s ago."""
    config = parse_config({
        "federation": {"name": "unit", "sites": ["A", "B"]},
        "rounds": {"evaluate_deadline_seconds": 60.0},
        "coordinator": {"state_dir": "state", "long_poll_seconds": 5.0}}, tmp_path)
    store = Store(config.database_url, config.state_dir)
    try:
        store.sync_roster(["A", "B"])
        for site in ("A", "B"):
            store.add_token(site, f"token-{site}", 60)
            store.redeem_token(site, f"token-{site}", bytes(32))
        with store.session() as session:
            session.get(SiteRow, "B").last_seen = time.time() - last_seen_ago
        transport = NetworkTransport(store, config, TaskBoard(),
                                     ModelShelf(config.state_dir / "models", {}))
        transport.serving_since = time.time() - serving_for

        def reply(site: str, delay: float) -> None:
            time.sleep(delay)
            transport.submit_evaluation(site, 1, wire.EvaluationBody(
                num_samples=4, metrics={"accuracy": 0.5}))

        threading.Thread(target=reply, args=("A", 0.3), daemon=True).start()
        if b_replies:
            threading.Thread(target=reply, args=("B", 1.0), daemon=True).start()
        started = time.monotonic()
        results = transport.evaluate(1, MODEL, ["A", "B"])
        return results, time.monotonic() - started
    finally:
        store.close()


def test_quiet_site_not_waited_for(tmp_path):
    # The coordinator has served for an hour; B has been silent for 10 minutes.
    results, waited = evaluate_with(tmp_path, last_seen_ago=600, serving_for=3600,
                                    b_replies=False)
    assert waited < 10
    assert isinstance(results[0], EvaluateReply)
    assert results[0].metrics == {"accuracy": 0.5}
    assert isinstance(results[1], Failure)
    assert re.fullmatch(r"site offline, last contact 60\d s ago", results[1].reason)


def test_restart_does_not_make_sites_offline(tmp_path):
    # The coordinator just restarted after 2 minutes down: B's silence was the
    # outage, so B is waited for and its reply counts.
    results, waited = evaluate_with(tmp_path, last_seen_ago=120, serving_for=1,
                                    b_replies=True)
    assert waited < 10
    assert [type(r).__name__ for r in results] == ["EvaluateReply", "EvaluateReply"]

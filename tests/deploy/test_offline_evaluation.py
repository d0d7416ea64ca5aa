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


def test_quiet_site_not_waited_for(tmp_path):
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
        # B was last heard from 10 minutes ago, A just now.
        with store.session() as session:
            session.get(SiteRow, "B").last_seen = time.time() - 600
        transport = NetworkTransport(store, config, TaskBoard(),
                                     ModelShelf(config.state_dir / "models", {}))

        def reply_as_a() -> None:
            time.sleep(0.3)
            transport.submit_evaluation("A", 1, wire.EvaluationBody(
                num_samples=4, metrics={"accuracy": 0.5}))

        threading.Thread(target=reply_as_a, daemon=True).start()
        started = time.monotonic()
        results = transport.evaluate(1, MODEL, ["A", "B"])
        waited = time.monotonic() - started
    finally:
        store.close()
    assert waited < 10
    assert isinstance(results[0], EvaluateReply)
    assert results[0].metrics == {"accuracy": 0.5}
    assert isinstance(results[1], Failure)
    assert re.fullmatch(r"site offline, last contact 60\d s ago", results[1].reason)

"""Site agent cases without a coordinator: withdrawn exchanges, rejected updates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from prifed.deploy.agent import AgentOptions, SiteAgent, _Pending
from prifed.deploy.errors import CoordinatorError
from prifed.deploy.sitedata import TableSource


class GoneCoordinator:
    """A client whose every request gets the given error back."""

    def __init__(self, status: int, code: str) -> None:
        self.status = status
        self.code = code
        self.requests: list[tuple[str, str]] = []

    def request(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        self.requests.append((method, path))
        raise CoordinatorError(self.status, self.code, f"exchange {path} is gone")


def agent_with(tmp_path: Path, client: GoneCoordinator) -> tuple[SiteAgent, list]:
    events: list[tuple[str, dict[str, Any]]] = []
    options = AgentOptions("https://127.0.0.1:1", tmp_path / "ca.pem", "A",
                           tmp_path / "site")
    agent = SiteAgent(options, TableSource(None, None),
                      events=lambda name, details: events.append((name, details)))
    agent.handlers["echo"] = lambda request, task: request
    agent.client = client  # type: ignore[assignment]
    return agent, events


def test_withdrawn_exchange_is_skipped(tmp_path):
    client = GoneCoordinator(404, "unknown_exchange")
    agent, events = agent_with(tmp_path, client)
    agent.exchange({"kind": "exchange", "channel": "echo", "exchange": "e-1"})
    assert client.requests == [("GET", "/v1/exchanges/e-1")]
    assert events == [("withdrawn", {"exchange": "e-1", "channel": "echo"})]


def test_other_exchange_error_still_raises(tmp_path):
    agent, _ = agent_with(tmp_path, GoneCoordinator(403, "revoked"))
    with pytest.raises(CoordinatorError) as caught:
        agent.exchange({"kind": "exchange", "channel": "echo", "exchange": "e-1"})
    assert caught.value.code == "revoked"


class RecordingClient:
    """A client that records every JSON request and returns no body."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Any]] = []

    def json(self, method: str, path: str, value: Any = None, **kwargs: Any) -> None:
        self.sent.append((method, path, value))


def test_rejected_update_dropped_and_reported(tmp_path, monkeypatch):
    client = RecordingClient()
    agent, events = agent_with(tmp_path, client)  # type: ignore[arg-type]
    agent.folder.mkdir(parents=True)
    pending = _Pending(3, b"update", 10, {}, ({"setup": "x"}, {}))
    agent._save_pending(pending)
    monkeypatch.setattr(agent, "trainer", lambda setup: None)

    def reject_upload(server_round: int, update: Any) -> None:
        raise CoordinatorError(422, "update_rejected",
                               "num_samples 1710 is more than the 171 training rows")

    monkeypatch.setattr(agent, "upload", reject_upload)
    agent.train({"kind": "train", "round": 3, "setup": {}})
    # The update is not kept for a resend, and the coordinator hears why.
    assert agent._load_pending() is None
    assert client.sent == [("POST", "/v1/rounds/3/failure", {
        "reason": "update rejected (update_rejected): num_samples 1710 is more "
                  "than the 171 training rows"})]
    assert ("rejected", {"round": 3, "code": "update_rejected",
                         "detail": "num_samples 1710 is more than the 171 training "
                                   "rows"}) in events

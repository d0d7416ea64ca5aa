"""The asynchronous driver with its store and transport in one process, no HTTP.

Tests play the sites: they take tasks off the task board and upload through
the transport methods that the HTTP handlers call, in an order they choose.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from prifed.deploy import wire
from prifed.deploy.buffered import BufferedRun
from prifed.deploy.config import parse_config
from prifed.deploy.errors import RequestRejected
from prifed.deploy.store import Store
from prifed.deploy.transport import ModelShelf, NetworkTransport, TaskBoard
from prifed.strategies import build_strategy

INITIAL = {"w": np.array([1.0, 2.0, 3.0], np.float32), "b": np.zeros(1, np.float32)}


class Harness:
    """A coordinator's store, transport and asynchronous driver in one process."""

    def __init__(self, root: Path, sites: list[str], rounds: int, buffer_size: int,
                 deadline: float = 60.0, joined: bool = False,
                 initial: dict[str, np.ndarray] | None = None,
                 trainable: list[str] | None = None, keep_updates: bool = True,
                 attempts: int = 3) -> None:
        self.initial = INITIAL if initial is None else initial
        self.trainable = list(self.initial) if trainable is None else trainable
        self.config = parse_config({
            "federation": {"name": "unit", "sites": sites},
            "training": {"strategy": "fedbuff", "rounds": rounds,
                         "strategy_options": {"buffer_size": buffer_size}},
            "rounds": {"deadline_seconds": deadline, "attempts": attempts,
                       "evaluate_deadline_seconds": 1.0},
            "coordinator": {"state_dir": "state", "keep_updates": keep_updates}},
            root)
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

    def upload(self, site: str, task: dict[str, Any], shift: float = 1.0,
               num_samples: int = 10, value: float | None = None) -> str:
        """Upload the task's model plus ``shift``, or with every value ``value``.

        Returns the upload's id.
        """
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
        return str(status["upload"])

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

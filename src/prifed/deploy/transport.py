"""The network transport: the round engine's Transport, served to sites over HTTPS.

The round engine runs in a worker thread and calls :meth:`NetworkTransport.train`
as it would call the in-process transport. Instead of calling sites, the
transport posts tasks on a :class:`TaskBoard`. Sites fetch them by long
polling, and HTTP handler threads hand their replies back through the
``submit`` and ``commit`` methods here. Every accepted reply is on disk and
in the database before the site hears "accepted", so a restarted coordinator
finds it again.

Replies reach the engine one at a time, read back from disk, so the
coordinator holds one update in memory however many sites there are. By
default they are released in the order of the round's instructions, which
makes the float sums, and so the model, independent of arrival order;
``ordered=False`` releases them as they arrive instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prifed.core.messages import EvaluateReply, Failure, TrainInstruction, TrainReply
from prifed.core.params import ParameterSet, params_from_bytes, params_to_bytes, \
    validate_update
from prifed.deploy import wire
from prifed.deploy.config import FederationConfig
from prifed.deploy.errors import RequestRejected, ServiceStopped
from prifed.deploy.store import SITE_JOINED, SITE_REVOKED, AcceptedUpdate, Store, \
    UploadRow, sync_folder, write_atomic
from prifed.errors import ProtocolError, UpdateRejected
from prifed.log import get_logger, round_label

logger = get_logger(__name__)

ReplyValidator = Callable[[str, bytes], None]
"""Checks one exchange reply (site, decompressed body); raises RequestRejected."""

REPORTED_FAILURE = "site reported: "
"""Start of the reason of a failure that the site reported itself."""

ReplyCheck = Callable[[TrainReply, Mapping[str, np.ndarray]], None]
"""Checks one training reply against the global model; raises UpdateRejected."""


def default_reply_check(reply: TrainReply, params: Mapping[str, np.ndarray]) -> None:
    """Check names, shapes, dtypes and finite values against the global model."""
    validate_update(reply.site, params, reply.params)


class TaskBoard:
    """Tasks waiting for each site, and the wake-up of their long polls.

    Worker threads post and withdraw tasks; the event loop's handlers wait
    for them. A task is a JSON dict with a unique ``"id"``. A site keeps
    getting the same task until it is withdrawn, so a site that restarts
    picks its task up again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[str, dict[str, dict[str, Any]]] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._final: dict[str, Any] | None = None
        self.saw_final: set[str] = set()

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach the event loop whose handlers wait for tasks."""
        self._loop = loop

    def post(self, site: str, task: dict[str, Any]) -> None:
        """Offer a task to a site and wake its long poll."""
        with self._lock:
            self._tasks.setdefault(site, {})[task["id"]] = task
        self._wake(site)

    def withdraw(self, site: str, task_id: str) -> None:
        """Remove a task that is no longer wanted."""
        with self._lock:
            self._tasks.get(site, {}).pop(task_id, None)

    def finish(self, task: dict[str, Any]) -> None:
        """Replace every task with ``task`` (the end of the run) for all sites."""
        with self._lock:
            self._final = task
            self._tasks.clear()
            sites = list(self._events)
        for site in sites:
            self._wake(site)

    def next_task(self, site: str) -> dict[str, Any] | None:
        """Return the site's oldest task, the final task, or None."""
        with self._lock:
            if self._final is not None:
                self.saw_final.add(site)
                return self._final
            tasks = self._tasks.get(site)
            if tasks:
                return next(iter(tasks.values()))
            return None

    async def wait(self, site: str, timeout: float) -> dict[str, Any] | None:
        """Wait up to ``timeout`` seconds for a task for ``site``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        event = self._events.setdefault(site, asyncio.Event())
        while True:
            event.clear()
            task = self.next_task(site)
            if task is not None:
                return task
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return None

    def _wake(self, site: str) -> None:
        event = self._events.get(site)
        if event is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(event.set)


class ModelShelf:
    """Global model versions as safetensors files, and their compressed downloads."""

    def __init__(self, folder: Path, model_metadata: Mapping[str, str]) -> None:
        self.folder = folder
        self.metadata = dict(model_metadata)
        self._lock = threading.Lock()
        self._digests: dict[int, str] = {}
        self._cache: tuple[int, bytes] | None = None

    def path(self, version: int) -> Path:
        """Return the file of a model version."""
        return self.folder / f"model-{version:04d}.safetensors"

    def publish(self, version: int,
                params: Mapping[str, np.ndarray]) -> tuple[Path, str]:
        """Write a model version unless it is on disk; return its path and SHA-256."""
        data = params_to_bytes(params, dict(self.metadata, version=str(version)))
        digest = hashlib.sha256(data).hexdigest()
        path = self.path(version)
        with self._lock:
            if self._digests.get(version) != digest:
                write_atomic(path, data)
                self._digests[version] = digest
                if self._cache is not None and self._cache[0] == version:
                    self._cache = None
        return path, digest

    def load(self, version: int) -> ParameterSet:
        """Read a model version from disk."""
        return params_from_bytes(self.path(version).read_bytes())

    def payload(self, version: int) -> bytes:
        """Return a version's compressed safetensors for download (404 if absent)."""
        with self._lock:
            if self._cache is not None and self._cache[0] == version:
                return self._cache[1]
        path = self.path(version)
        if not path.is_file():
            raise RequestRejected(404, "unknown_model",
                                  f"model version {version} is not published")
        payload = wire.compress(path.read_bytes())
        with self._lock:
            self._cache = (version, payload)
        return payload


@dataclass
class _TrainRound:
    number: int
    label: str
    reference: ParameterSet
    order: list[str]
    instructions: dict[str, TrainInstruction]
    accepted: dict[str, AcceptedUpdate]
    failed: dict[str, str]
    arrivals: list[str]
    attempt: int
    deadline: float
    model_version: int
    asynchronous: bool = False
    closed: bool = False
    skip_reason: str | None = None

    def pending(self) -> list[str]:
        return [s for s in self.order
                if s not in self.accepted and s not in self.failed]


@dataclass
class _Evaluation:
    number: int
    sites: list[str]
    label: str
    deadline: float
    replies: dict[str, EvaluateReply] = field(default_factory=dict)
    unwaited: set[str] = field(default_factory=set)
    """Sites whose reply is taken if it comes but not waited for."""

    def finished(self) -> bool:
        return (all(s in self.replies for s in self.sites if s not in self.unwaited)
                or time.monotonic() >= self.deadline)


@dataclass
class _Exchange:
    exchange_id: str
    channel: str
    requests: dict[str, bytes]
    validate: ReplyValidator | None
    max_reply_bytes: int
    replies: dict[str, bytes] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    arrivals: list[str] = field(default_factory=list)

    def answered(self) -> int:
        return len(self.replies) + len(self.rejected)


class NetworkTransport:
    """The coordinator side of the round protocol, for the round engine and handlers."""

    def __init__(self, store: Store, config: FederationConfig, board: TaskBoard,
                 models: ModelShelf, ordered: bool = True) -> None:
        self.store = store
        self.config = config
        self.board = board
        self.models = models
        self.ordered = ordered
        self.num_rounds = config.training.rounds
        self.participants: list[str] = list(config.federation.sites)
        self.setup_blocks: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._rounds: dict[int, _TrainRound] = {}
        self._ended: list[int] = []
        self._training_started = False
        """False until the first round or task opens in this process."""
        self._last_closed = 0
        self._evaluations: dict[int, _Evaluation] = {}
        self._exchanges: dict[str, _Exchange] = {}
        self._extras: dict[tuple[int, str], bytes] = {}
        self._validators = ThreadPoolExecutor(config.limits.concurrent_validations,
                                              thread_name_prefix="prifed-validate")
        self._stopped = False
        self.finished = False
        self.check_reply: ReplyCheck = default_reply_check
        self.check_labels: Callable[[str, Mapping[str, str]], None] | None = None
        """Checks a site's update metadata, such as its FHIR spec hash."""
        self.serving_since = time.time()
        """When this process began serving: silence before it does not count."""
        self.max_samples: dict[str, int] = {}
        """Training rows each site reported in setup: the most an update may count."""

    # The Transport protocol.

    def site_ids(self) -> list[str]:
        """Return the participants in roster order, revoked sites left out."""
        revoked = {s.name for s in self.store.sites() if s.status == SITE_REVOKED}
        return [site for site in self.participants if site not in revoked]

    def train(self, server_round: int, params: Mapping[str, np.ndarray],
              instructions: Sequence[TrainInstruction]
              ) -> Iterator[TrainReply | Failure]:
        """Post training tasks and yield replies as the round's rules release them."""
        state = self._open_round(server_round, params, instructions)
        try:
            yield from self._release(state)
        except BaseException:
            # Stopping or crashing leaves the round open in the database, so a
            # restarted coordinator resumes it instead of closing it early.
            self._forget_round(state)
            raise
        self._close_round(state)

    def evaluate(self, server_round: int, params: Mapping[str, np.ndarray],
                 sites: Sequence[str], label: str | None = None
                 ) -> list[EvaluateReply | Failure]:
        """Ask joined sites to evaluate this round's model; wait for the deadline.

        ``server_round`` is the model version; ``label`` names it in the log
        (by default "round N/M"). A site not heard from for longer than two
        long polls and 30 s (counted from this process's start at most) is
        taken as offline. It gets the task, and its reply counts if it comes
        while the evaluation is open, but the round does not wait for it.
        """
        offline = self._offline_sites(sites)
        state = self.post_evaluation(server_round, params, sites, label)
        with self._cond:
            state.unwaited = set(offline)
            while not state.finished():
                self._raise_if_stopped()
                self._cond.wait(max(state.deadline - time.monotonic(), 0.0))
        results = self.close_evaluation(server_round, sites)
        return [Failure(r.site, server_round, f"site offline, {offline[r.site]}")
                if isinstance(r, Failure) and r.site in offline else r
                for r in results]

    def _offline_sites(self, sites: Sequence[str]) -> dict[str, str]:
        """Return the joined sites not heard from lately, with their last contact."""
        quiet = 2 * self.config.coordinator.long_poll_seconds + 30
        now = time.time()
        offline = {}
        for info in self.store.sites():
            if info.name not in sites or info.status != SITE_JOINED:
                continue
            # Sites cannot reach a coordinator that is down, so the time
            # before this process started does not count as their silence.
            last_contact = max(info.last_seen or 0.0, self.serving_since)
            if now - last_contact > quiet:
                seen = "never" if info.last_seen is None \
                    else f"{now - info.last_seen:.0f} s ago"
                offline[info.name] = f"last contact {seen}"
        return offline

    def post_evaluation(self, version: int, params: Mapping[str, np.ndarray],
                        sites: Sequence[str], label: str | None = None
                        ) -> _Evaluation:
        """Post evaluation tasks of a model version to joined sites; do not wait.

        Replies stored before a restart count without asking the site again.
        Collect the result with :meth:`close_evaluation`, once
        :meth:`finished_evaluations` lists the version or whenever the caller
        stops waiting.
        """
        self.models.publish(version, params)
        joined = {s.name for s in self.store.sites() if s.status == SITE_JOINED}
        state = _Evaluation(version, [s for s in sites if s in joined],
                            label or round_label(version, self.num_rounds),
                            time.monotonic()
                            + self.config.rounds.evaluate_deadline_seconds)
        for site, (num_samples, metrics) in self.store.evaluations(version).items():
            state.replies[site] = EvaluateReply(site, num_samples,
                                                wire.metrics_from_json(metrics))
        task = {"id": f"evaluate:{version}", "kind": "evaluate",
                "round": version, "num_rounds": self.num_rounds,
                "model_version": version}
        with self._cond:
            self._evaluations[version] = state
        for site in state.sites:
            if site not in state.replies:
                self.board.post(site, dict(task, setup=self.setup_blocks.get(site)))
        return state

    def finished_evaluations(self) -> list[int]:
        """List the open evaluations that every site replied to or that timed out."""
        with self._cond:
            return [n for n, state in self._evaluations.items() if state.finished()]

    def close_evaluation(self, version: int, sites: Sequence[str]
                         ) -> list[EvaluateReply | Failure]:
        """Stop an evaluation; return a reply or failure per site, in that order."""
        with self._cond:
            state = self._evaluations.pop(version)
        for site in state.sites:
            self.board.withdraw(site, f"evaluate:{version}")
        logger.info("evaluate %s: %d of %d sites replied", state.label,
                    len(state.replies), len(state.sites))
        results: list[EvaluateReply | Failure] = []
        for site in sites:
            if site in state.replies:
                results.append(state.replies[site])
            elif site in state.sites:
                results.append(Failure(site, version, "no evaluation before the "
                                       "deadline"))
            else:
                results.append(Failure(site, version, "site has not joined"))
        return results

    def exchange(self, channel: str, exchange_id: str, server_round: int,
                 requests: Mapping[str, bytes], deadline_seconds: float,
                 validate: ReplyValidator | None = None,
                 max_reply_bytes: int | None = None
                 ) -> Iterator[tuple[str, bytes] | Failure]:
        """Relay one request to each site and yield replies as they arrive.

        The generic extension point for protocols with their own messages
        (statistics, secure aggregation phases, encrypted sums). A site gets
        task ``{"kind": "exchange", "channel": ...}``, downloads its request
        and posts one reply, which ``validate`` checks before it is stored.
        Replies are stored under ``exchange_id``, so running the same exchange
        again after a restart returns them without asking the sites twice.
        A site whose reply ``validate`` rejects is yielded as a failure at
        once, and sites with no reply at the deadline when it passes.
        """
        limit = max_reply_bytes or self.config.limits.max_exchange_bytes
        state = _Exchange(exchange_id, channel, dict(requests), validate, limit)
        for site, body in self.store.exchange_replies(exchange_id).items():
            if site in state.requests:
                state.replies[site] = body
                state.arrivals.append(site)
        task_id = f"exchange:{exchange_id}"
        with self._cond:
            self._exchanges[exchange_id] = state
        for site, body in state.requests.items():
            if site not in state.replies:
                self.board.post(site, {"id": task_id, "kind": "exchange",
                                       "channel": channel, "exchange": exchange_id,
                                       "round": server_round, "size": len(body)})
        deadline = time.monotonic() + deadline_seconds
        position = 0
        try:
            while True:
                with self._cond:
                    while (position == len(state.arrivals)
                           and state.answered() < len(state.requests)):
                        self._raise_if_stopped()
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    done = (state.answered() == len(state.requests)
                            or time.monotonic() >= deadline)
                    if done:
                        self._exchanges.pop(exchange_id, None)
                    ready = state.arrivals[position:]
                    position = len(state.arrivals)
                for site in ready:
                    if site in state.rejected:
                        yield Failure(site, server_round, state.rejected[site])
                    else:
                        yield site, state.replies[site]
                if done:
                    break
        finally:
            with self._cond:
                self._exchanges.pop(exchange_id, None)
            for site in state.requests:
                self.board.withdraw(site, task_id)
        for site in state.requests:
            if site not in state.replies and site not in state.rejected:
                yield Failure(site, server_round, f"no reply to exchange "
                              f"{exchange_id!r} before the deadline")

    def stop(self) -> None:
        """Make every wait of the worker thread raise ServiceStopped."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _raise_if_stopped(self) -> None:
        if self._stopped:
            raise ServiceStopped("the coordinator is stopping")

    # Training rounds.

    def _open_round(self, server_round: int, params: Mapping[str, np.ndarray],
                    instructions: Sequence[TrainInstruction],
                    model_version: int | None = None) -> _TrainRound:
        asynchronous = model_version is not None
        if model_version is None:
            label = round_label(server_round, self.num_rounds)
            model_version = server_round - 1
            self.models.publish(model_version, params)
        else:
            label = f"task {server_round} (model version {model_version})"
        described = [{"site": i.site, "config": wire.to_json(i.config),
                      "extra": sorted(i.extra)} for i in instructions]
        stored = self.store.round_row(server_round)
        accepted: dict[str, AcceptedUpdate] = {}
        failed: dict[str, str] = {}
        attempt = 1
        if stored is None:
            self.store.open_round(server_round, described)
        else:
            if stored["instructions"] != described:
                raise ProtocolError(
                    f"{label} was opened with other instructions before the restart; "
                    "the state folder does not match this run")
            attempt = stored["attempt"]
            sites = {i.site for i in instructions}
            accepted = {s: u for s, u in self.store.accepted_updates(server_round)
                        .items() if s in sites}
            failed = {s: r for s, r in self.store.site_failures(server_round).items()
                      if s in sites and s not in accepted}
            if stored["status"] != "open":
                for site in sites - set(accepted) - set(failed):
                    failed[site] = "no reply before the round closed"
            logger.info("fit %s: resumed (attempt %d) with %d accepted updates",
                        label, attempt, len(accepted))
        order = [i.site for i in instructions]
        state = _TrainRound(server_round, label, dict(params), order,
                            {i.site: i for i in instructions}, accepted, failed,
                            [s for s in order if s in accepted or s in failed],
                            attempt,
                            time.monotonic() + self.config.rounds.deadline_seconds,
                            model_version, asynchronous)
        for instruction in instructions:
            if instruction.extra:
                self._extras[(server_round, instruction.site)] = wire.encode_tensors(
                    instruction.extra, {"round": str(server_round)})
        with self._cond:
            self._rounds[server_round] = state
            # The asynchronous driver reopens many tasks and then calls
            # open_for_uploads; a synchronous run opens one round at a time.
            self._training_started = self._training_started or not asynchronous
        for site in state.pending():
            self.board.post(site, self._train_task(state, state.instructions[site]))
        return state

    def _train_task(self, state: _TrainRound,
                    instruction: TrainInstruction) -> dict[str, Any]:
        return {"id": f"train:{state.number}", "kind": "train", "round": state.number,
                "num_rounds": self.num_rounds, "model_version": state.model_version,
                "label": state.label,
                "config": wire.to_json(instruction.config),
                "extra": bool(instruction.extra),
                "setup": self.setup_blocks.get(instruction.site)}

    def _release(self, state: _TrainRound) -> Iterator[TrainReply | Failure]:
        need = min(self.config.rounds.min_sites, len(state.order))
        position = 0
        while position < len(state.order):
            with self._cond:
                ready = self._wait_for_release(state, need, position)
            for site in ready:
                position += 1
                if state.skip_reason is not None:
                    yield Failure(site, state.number, state.skip_reason)
                elif site in state.accepted:
                    yield self._load_reply(state, state.accepted[site])
                else:
                    yield Failure(site, state.number, state.failed[site])

    def _wait_for_release(self, state: _TrainRound, need: int,
                          position: int) -> list[str]:
        """Wait (holding the lock) until replies may go to the engine; list them."""
        while True:
            self._raise_if_stopped()
            sequence = state.order if self.ordered else state.arrivals
            if not state.pending():
                if len(state.accepted) < need and state.skip_reason is None:
                    state.skip_reason = (f"left out: {state.label} got "
                                         f"{len(state.accepted)} accepted updates, "
                                         f"fewer than min_sites={need}")
                    logger.warning("fit %s: %d accepted updates, minimum %d; round "
                                   "skipped", state.label, len(state.accepted), need)
                state.closed = True
                return list(sequence[position:])
            if len(state.accepted) >= need:
                ready = []
                for site in sequence[position:]:
                    if site in state.accepted or site in state.failed:
                        ready.append(site)
                    else:
                        break
                if ready:
                    return ready
            remaining = state.deadline - time.monotonic()
            if remaining <= 0:
                self._on_deadline(state, need)
                continue
            self._cond.wait(remaining)

    def _on_deadline(self, state: _TrainRound, need: int) -> None:
        attempts = self.config.rounds.attempts
        seconds = self.config.rounds.deadline_seconds
        pending = state.pending()
        if len(state.accepted) < need and state.attempt < attempts:
            state.attempt += 1
            state.deadline = time.monotonic() + seconds
            self.store.set_attempt(state.number, state.attempt)
            logger.warning("fit %s: %d of %d updates by the deadline, minimum %d; "
                           "retrying (attempt %d/%d, waiting for %s)", state.label,
                           len(state.accepted), len(state.order), need, state.attempt,
                           attempts, ", ".join(pending))
            return
        for site in pending:
            state.failed[site] = (f"no reply before the deadline ({seconds:g} s, "
                                  f"attempt {state.attempt}/{attempts})")
            state.arrivals.append(site)
        logger.warning("fit %s: deadline passed; closing with %d updates, %d sites "
                       "without reply (%s)", state.label, len(state.accepted),
                       len(pending), ", ".join(pending))

    def _load_reply(self, state: _TrainRound, update: AcceptedUpdate) -> TrainReply:
        tensors, _ = wire.decode_tensors(update.path.read_bytes(),
                                         self.config.limits.max_update_bytes, "update")
        params, extra = wire.split_update(tensors, list(state.reference))
        return TrainReply(update.site, state.number, params, update.num_samples,
                          wire.metrics_from_json(update.metrics), extra)

    def _close_round(self, state: _TrainRound) -> None:
        with self._cond:
            state.closed = True
            self._last_closed = max(self._last_closed, state.number)
        self._forget_round(state)
        self.store.close_round(state.number)

    def _forget_round(self, state: _TrainRound) -> None:
        with self._cond:
            if self._rounds.get(state.number) is state:
                del self._rounds[state.number]
        for site in state.order:
            self.board.withdraw(site, f"train:{state.number}")
        for key in [k for k in self._extras if k[0] == state.number]:
            del self._extras[key]

    # Asynchronous tasks: one site each, on any model version, many open at once.

    def open_task(self, task: int, instruction: TrainInstruction, version: int,
                  params: Mapping[str, np.ndarray]) -> None:
        """Post one site's training task on model ``version`` (already published).

        ``instruction.server_round`` must be ``task``, which the site echoes
        in its upload. A task resumed after a restart whose update was
        already accepted, or whose failure was reported, is queued as ended
        at once, so :meth:`wait_for_ended` hands it over again.
        """
        if instruction.server_round != task:
            raise ProtocolError(f"task {task}: instruction is for round "
                                f"{instruction.server_round}")
        state = self._open_round(task, params, [instruction], model_version=version)
        with self._cond:
            if not state.pending():
                self._ended.append(task)
                self._cond.notify_all()

    def open_for_uploads(self) -> None:
        """Reply 409 to uploads for unknown rounds, no longer 503 "not_ready".

        Opening a synchronous round does this too. The asynchronous driver
        calls it once it has reopened every task of a resumed run.
        """
        with self._cond:
            self._training_started = True

    def wait_for_ended(self, timeout: float) -> list[int]:
        """Wait up to ``timeout`` seconds for ended tasks; list them as they came."""
        with self._cond:
            self._raise_if_stopped()
            if not self._ended and timeout > 0:
                self._cond.wait(timeout)
                self._raise_if_stopped()
            ended, self._ended = self._ended, []
        return ended

    def task_result(self, task: int) -> TrainReply | Failure:
        """Return an ended task's reply, read back from disk, or its failure."""
        with self._cond:
            state = self._rounds[task]
        site = state.order[0]
        if site in state.accepted:
            return self._load_reply(state, state.accepted[site])
        return Failure(site, task, state.failed.get(site, "task ended without reply"))

    def expire_task(self, task: int, reason: str) -> bool:
        """Fail a task that is still waiting for its site; False if it has ended."""
        with self._cond:
            state = self._rounds.get(task)
            if state is None or not state.pending():
                return False
            state.failed[state.order[0]] = reason
            state.closed = True
        self.board.withdraw(state.order[0], f"train:{task}")
        return True

    def close_task(self, task: int) -> None:
        """Stop taking an update for a task and drop its unfinished uploads."""
        with self._cond:
            state = self._rounds.get(task)
            if state is not None:
                for site in state.pending():
                    state.failed[site] = "the coordinator no longer wants this task"
        if state is not None:
            self._close_round(state)
        else:
            self.store.close_round(task)
        for upload in self.store.uploads_of_round(task):
            self._discard_upload(upload.id)

    # Handlers: uploads of updates.

    def _writable_round(self, site: str, server_round: int) -> _TrainRound:
        """Return the open round if ``site`` may still send it an update (locked)."""
        if self.finished:
            raise RequestRejected(409, "run_finished", "the run is finished; no round "
                                  "takes updates")
        state = self._rounds.get(server_round)
        if state is None and not self._training_started:
            # A restarted coordinator has not reopened its rounds yet; 503 makes
            # the agent retry instead of dropping an update it may still send.
            raise RequestRejected(503, "not_ready",
                                  "the coordinator is starting and has not opened "
                                  "its rounds yet; retry shortly")
        if state is None:
            own = sorted(n for n, r in self._rounds.items()
                         if site in r.instructions and not r.closed)
            word = "task" if any(r.asynchronous for r in self._rounds.values()) \
                else "round"
            now_open = (f"site {site!r} has {word} {own[0]} open" if own
                        else f"no {word} is open for site {site!r} now")
            if 1 <= server_round <= self._last_closed or \
                    self.store.round_row(server_round) is not None:
                raise RequestRejected(409, "round_closed",
                                      f"{word} {server_round} is closed; {now_open}")
            raise RequestRejected(409, "wrong_round",
                                  f"{word} {server_round} is not open; {now_open}")
        if site not in state.instructions:
            raise RequestRejected(403, "not_selected",
                                  f"site {site!r} was not selected for round "
                                  f"{server_round}")
        if site in state.failed:
            raise RequestRejected(409, "round_closed",
                                  f"round {server_round} no longer takes an update "
                                  f"from site {site!r}: {state.failed[site]}")
        if state.closed:
            raise RequestRejected(409, "round_closed",
                                  f"round {server_round} is closed")
        return state

    def part_path(self, upload_id: str) -> Path:
        """Return the file that collects an upload's bytes."""
        return self.store.state_dir / "uploads" / f"{upload_id}.part"

    def start_upload(self, site: str, server_round: int,
                     body: wire.UploadBody) -> dict[str, Any]:
        """Open or resume an upload; report the offset to continue from."""
        with self._cond:
            state = self._writable_round(site, server_round)
            accepted = state.accepted.get(site)
        if accepted is not None:
            return self._already_accepted(site, server_round, accepted, body.sha256)
        max_rows = self.max_samples.get(site)
        if max_rows is not None and body.num_samples > max_rows:
            raise RequestRejected(422, "update_rejected",
                                  f"num_samples {body.num_samples} is more than the "
                                  f"{max_rows} training rows site {site!r} reported in "
                                  "setup; an update counts the distinct rows it "
                                  "used")
        limit = self.config.limits.max_update_bytes
        if body.size > limit:
            raise RequestRejected(413, "too_large",
                                  f"update of {body.size} bytes is over the limit of "
                                  f"{limit} bytes")
        upload_id = upload_key(site, server_round, body.sha256, body.num_samples)
        row = self.store.create_upload(UploadRow(
            id=upload_id, site=site, round=server_round, size=body.size,
            sha256=body.sha256, num_samples=body.num_samples,
            metrics=wire.dumps(body.metrics).decode(), created_at=time.time()))
        part = self.part_path(upload_id)
        offset = part.stat().st_size if part.exists() else 0
        return {"status": "open", "upload": row.id, "offset": offset,
                "size": row.size}

    def _already_accepted(self, site: str, server_round: int, accepted: AcceptedUpdate,
                          sha256: str) -> dict[str, Any]:
        if accepted.sha256 != sha256:
            raise RequestRejected(409, "duplicate_update",
                                  f"site {site!r} already has an accepted update for "
                                  f"round {server_round}; a second one is refused")
        return {"status": "accepted", "round": server_round}

    def upload_for_chunk(self, site: str, upload_id: str) -> UploadRow:
        """Return an upload that ``site`` may append to (404/409 otherwise)."""
        row = self.store.upload(upload_id)
        if row is None or row.site != site:
            raise RequestRejected(404, "unknown_upload",
                                  f"upload {upload_id!r} does not exist for site "
                                  f"{site!r}; start it again")
        with self._cond:
            self._writable_round(site, row.round)
        return row

    def commit_upload(self, site: str, upload_id: str) -> dict[str, Any]:
        """Validate a complete upload and accept it as the site's update."""
        row = self.store.upload(upload_id)
        if row is None or row.site != site:
            # A commit sent again after its reply was lost, for example to a
            # restart, finds the update accepted and its upload gone.
            for number, sha256, num_samples in self.store.accepted_by(site):
                if upload_key(site, number, sha256, num_samples) == upload_id:
                    return {"status": "accepted", "round": number}
            raise RequestRejected(404, "unknown_upload",
                                  f"upload {upload_id!r} does not exist for site "
                                  f"{site!r}; start it again")
        with self._cond:
            state = self._writable_round(site, row.round)
            accepted = state.accepted.get(site)
        if accepted is not None:
            return self._already_accepted(site, row.round, accepted, row.sha256)
        part = self.part_path(upload_id)
        received = part.stat().st_size if part.exists() else 0
        if received < row.size:
            raise RequestRejected(409, "incomplete_upload",
                                  f"upload has {received} of its {row.size} bytes; "
                                  "send the rest before committing",
                                  {"offset": received})
        # Payloads are checked by a few dedicated threads, so at most that many
        # are in memory at once, and the C allocator keeps their buffers in a
        # few arenas instead of one per HTTP worker thread.
        try:
            self._validators.submit(self._validate_payload, site, row, state,
                                    part).result()
            return self._accept(site, row, state, part, received)
        except RequestRejected:
            self._discard_upload(upload_id)
            raise
        except FileNotFoundError:
            # A second commit of the same upload, sent while the first was
            # being checked: the first moved the part file into place.
            return self._accepted_meanwhile(site, row, state)

    def _accepted_meanwhile(self, site: str, row: UploadRow,
                            state: _TrainRound) -> dict[str, Any]:
        with self._cond:
            accepted = state.accepted.get(site)
        if accepted is None:
            raise RequestRejected(404, "unknown_upload",
                                  f"upload {row.id!r} of site {site!r} was "
                                  "discarded while it was committed; start it "
                                  "again")
        return self._already_accepted(site, row.round, accepted, row.sha256)

    def _validate_payload(self, site: str, row: UploadRow, state: _TrainRound,
                          part: Path) -> None:
        data = part.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != row.sha256:
            raise RequestRejected(400, "digest_mismatch",
                                  f"upload's SHA-256 is {digest[:16]}..., not the "
                                  f"declared {row.sha256[:16]}...; the upload is "
                                  "corrupt and was discarded")
        tensors, metadata = wire.decode_tensors(
            data, self.config.limits.max_update_bytes, "update")
        expected = {"format": wire.UPDATE_FORMAT, "site": site,
                    "round": str(row.round)}
        for key, value in expected.items():
            if metadata.get(key) != value:
                raise RequestRejected(400, "wrong_metadata",
                                      f"update metadata {key!r} must be {value!r}; "
                                      f"got {metadata.get(key)!r}")
        if self.check_labels is not None:
            self.check_labels(site, metadata)
        params, extra = wire.split_update(tensors, list(state.reference))
        wire.check_finite_extra(site, extra)
        reply = TrainReply(site, row.round, params, row.num_samples, {}, extra)
        try:
            self.check_reply(reply, state.reference)
        except UpdateRejected as error:
            where = f"tensor {error.tensor!r}: " if error.tensor else ""
            raise RequestRejected(422, "update_rejected", where + error.reason,
                                  {"tensor": error.tensor}) from None

    def _accept(self, site: str, row: UploadRow, state: _TrainRound, part: Path,
                size: int) -> dict[str, Any]:
        position = self.config.federation.sites.index(site)
        folder = self.store.state_dir / "updates" / f"round-{row.round:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"site-{position:03d}.safetensors.zst"
        with open(part, "rb") as handle:
            os.fsync(handle.fileno())
        with self._cond:
            self._writable_round(site, row.round)
            earlier = state.accepted.get(site)
            if earlier is None:
                part.replace(final)
                sync_folder(folder)
                metrics = wire.metrics_from_json(_json_dict(row.metrics))
                self.store.accept_update(row.round, site, row.sha256, final, size,
                                         row.num_samples, wire.to_json(metrics),
                                         row.id)
                state.accepted[site] = AcceptedUpdate(
                    site, row.sha256, final, row.num_samples, wire.to_json(metrics))
                state.arrivals.append(site)
                if state.asynchronous:
                    self._ended.append(state.number)
                self._cond.notify_all()
        if earlier is not None:
            # A concurrent commit of the same upload got in first.
            return self._already_accepted(site, row.round, earlier, row.sha256)
        self.board.withdraw(site, f"train:{row.round}")
        logger.info("fit %s: accepted update from site %s (%d bytes, %d samples)",
                    state.label, site, size, row.num_samples)
        return {"status": "accepted", "round": row.round}

    def _discard_upload(self, upload_id: str) -> None:
        self.part_path(upload_id).unlink(missing_ok=True)
        self.store.delete_upload(upload_id)

    def report_failure(self, site: str, server_round: int, reason: str) -> None:
        """Record a site's own report that it cannot train this round."""
        with self._cond:
            state = self._writable_round(site, server_round)
            if site in state.accepted:
                raise RequestRejected(409, "duplicate_update",
                                      f"site {site!r} already has an accepted update "
                                      f"for round {server_round}")
            self.store.record_site_failure(server_round, site, reason)
            state.failed[site] = REPORTED_FAILURE + reason
            state.arrivals.append(site)
            if state.asynchronous:
                self._ended.append(state.number)
            self._cond.notify_all()
        self.board.withdraw(site, f"train:{server_round}")

    def extra_payload(self, site: str, server_round: int) -> bytes:
        """Return the extra tensors of a site's training task (404 if none)."""
        payload = self._extras.get((server_round, site))
        if payload is None:
            raise RequestRejected(404, "no_extra",
                                  f"round {server_round} has no extra tensors for "
                                  f"site {site!r}")
        return payload

    # Handlers: evaluations and exchanges.

    def submit_evaluation(self, site: str, server_round: int,
                          body: wire.EvaluationBody) -> None:
        """Take one site's metrics of the round's model."""
        with self._cond:
            state = self._evaluations.get(server_round)
            if state is None:
                raise RequestRejected(409, "evaluation_closed",
                                      f"no evaluation of round {server_round} is open")
            if site not in state.sites:
                raise RequestRejected(403, "not_selected",
                                      f"site {site!r} was not asked to evaluate round "
                                      f"{server_round}")
            self.store.record_evaluation(server_round, site, body.num_samples,
                                         dict(body.metrics))
            state.replies[site] = EvaluateReply(site, body.num_samples,
                                                wire.metrics_from_json(body.metrics))
            self._cond.notify_all()
        self.board.withdraw(site, f"evaluate:{server_round}")

    def exchange_request(self, site: str, exchange_id: str) -> bytes:
        """Return the compressed request of an open exchange for ``site``."""
        with self._cond:
            state = self._exchanges.get(exchange_id)
            if state is None or site not in state.requests:
                raise RequestRejected(404, "unknown_exchange",
                                      f"exchange {exchange_id!r} is not open for site "
                                      f"{site!r}")
            body = state.requests[site]
        return wire.compress(body)

    def submit_exchange_reply(self, site: str, exchange_id: str,
                              payload: bytes) -> None:
        """Validate and store one site's reply to an exchange."""
        with self._cond:
            state = self._exchanges.get(exchange_id)
            if state is None or site not in state.requests:
                raise RequestRejected(409, "exchange_closed",
                                      f"exchange {exchange_id!r} is not open for site "
                                      f"{site!r}")
            if site in state.replies:
                return
            if site in state.rejected:
                raise RequestRejected(409, "exchange_closed",
                                      f"exchange {exchange_id!r} rejected the reply "
                                      f"of site {site!r} already: "
                                      f"{state.rejected[site]}")
        try:
            body = wire.decompress(payload, state.max_reply_bytes, "exchange reply")
            if state.validate is not None:
                state.validate(site, body)
        except RequestRejected as error:
            self._reject_exchange_reply(state, site, error)
            raise
        with self._cond:
            if site in state.replies or exchange_id not in self._exchanges:
                return
            self.store.record_exchange_reply(exchange_id, site, body)
            state.replies[site] = body
            state.arrivals.append(site)
            self._cond.notify_all()
        self.board.withdraw(site, f"exchange:{exchange_id}")
        logger.info("exchange %s: reply from site %s (%d bytes)", exchange_id, site,
                    len(body))


    def _reject_exchange_reply(self, state: _Exchange, site: str,
                               error: RequestRejected) -> None:
        """Count a rejected reply as the site's failure, so the exchange ends sooner."""
        reason = f"reply rejected ({error.code}): {error.detail}"
        with self._cond:
            if site in state.replies or site in state.rejected:
                return
            state.rejected[site] = reason
            state.arrivals.append(site)
            self._cond.notify_all()
        self.board.withdraw(site, f"exchange:{state.exchange_id}")
        logger.warning("exchange %s: rejected the reply of site %s: %s",
                       state.exchange_id, site, error.detail)


def upload_key(site: str, server_round: int, sha256: str, num_samples: int) -> str:
    """Return the id of an upload: the same declaration always gets the same id."""
    key = f"{site}\n{server_round}\n{sha256}\n{num_samples}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _json_dict(text: str) -> dict[str, Any]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}

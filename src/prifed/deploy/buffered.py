"""Asynchronous rounds in a deployed federation: FedBuff fed by the network transport.

With ``training.strategy = "fedbuff"`` the coordinator runs no rounds. Every
site has one training *task* at a time, on the model version that was
current when the task was handed out. When its update arrives, FedBuff adds
it to its buffer (weighted by staleness), and once the buffer contains
``buffer_size`` updates it makes a new model version. The site gets its next
task at once, on the newest version, so a slow site does not delay the
others. The run ends after ``training.rounds`` tasks per participating site
(the same budget as ``prifed simulate --strategy fedbuff``), counting
updates, reported failures and tasks that passed ``rounds.deadline_seconds``.
Every ``evaluate_every``-th version is evaluated by the sites while training
goes on, and the final model is evaluated by every site at the end.

Durability: before a task is posted, and after every batch of replies is
taken in, the whole state is committed to the database. It covers FedBuff's
open tasks and buffer (its sums in a safetensors file), the task counter and
each site's place in the queue. Model versions are files on the model shelf,
each with a record in the database. A coordinator killed at any moment
resumes from the last commit. Updates that sites delivered after it are
still on disk, so they are taken in again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from prifed.core.messages import EvaluateReply, Failure, TrainInstruction
from prifed.core.params import ParameterSet, params_from_bytes, params_to_bytes
from prifed.deploy import wire
from prifed.deploy.config import FederationConfig
from prifed.deploy.store import ModelRow, Store, write_atomic
from prifed.deploy.transport import REPORTED_FAILURE, ModelShelf, NetworkTransport
from prifed.errors import PriFedError, ProtocolError, UpdateRejected
from prifed.log import get_logger, redact
from prifed.strategies.fedbuff import FedBuff

logger = get_logger(__name__)

STATE_KEY = "buffered_state"
"""Meta key of the committed asynchronous state."""
RECORD_PREFIX = "buffered_record_"
"""Meta key prefix of the record of each model version."""


@dataclass
class OpenTask:
    """A training task handed to a site and not yet ended."""

    task: int
    site: str
    version: int
    deadline: float = 0.0


@dataclass
class BufferedState:
    """Everything beyond FedBuff's own state that a restart needs."""

    next_task: int = 1
    ended: int = 0
    tasks: dict[str, OpenTask] = field(default_factory=dict)
    dispatched: dict[str, int] = field(default_factory=dict)
    """Number of the task each site got last, so idle sites are served in turn."""
    buffered: list[dict[str, Any]] = field(default_factory=list)
    """Descriptions of the updates in FedBuff's buffer: site, task, staleness."""
    evaluating: list[int] = field(default_factory=list)
    """Model versions whose evaluation by the sites is still open."""
    dropped: list[dict[str, Any]] = field(default_factory=list)
    """Tasks that ended without an update in the buffer since the last version."""
    failures: dict[str, int] = field(default_factory=dict)
    """Failures each site reported in a row, reset by its next update."""
    left_out: list[str] = field(default_factory=list)
    """Sites left out of the rest of the run after ``attempts`` failures in a row."""
    elapsed: float = 0.0


class BufferedRun:
    """Drive FedBuff over the network transport until the task budget is spent."""

    def __init__(self, config: FederationConfig, store: Store,
                 transport: NetworkTransport, models: ModelShelf,
                 strategy: FedBuff,
                 on_version: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.config = config
        self.store = store
        self.transport = transport
        self.models = models
        self.strategy = strategy
        self.on_version = on_version
        self.state = BufferedState()
        self.budget = 0
        self._arrays_path: str | None = None
        self._buffer_mark: tuple[int, int] | None = None
        self._clock_start = time.monotonic()
        self._not_before: dict[str, float] = {}
        """Monotonic time before which a site that reported a failure gets no task."""

    # The run.

    def run(self, params: Mapping[str, np.ndarray], trainable: Sequence[str]
            ) -> ParameterSet:
        """Run from the committed state (or from ``params``); return the final model."""
        sites = self.transport.site_ids()
        self.budget = self.config.training.rounds * len(self.transport.participants)
        if not self._restore():
            self.strategy.start(params, trainable)
            self._commit()
        self._close_stale_tasks()
        logger.info("async: %d of %d tasks done, model version %d, buffer %d/%d, "
                    "%d sites", self.state.ended, self.budget, self.strategy.version,
                    len(self.state.buffered), self.strategy.buffer_size, len(sites))
        if self.state.ended < self.budget:
            self._reopen_tasks()
        self.transport.open_for_uploads()
        self._repost_evaluations()
        while self.state.ended < self.budget:
            self._step()
        self._close_open_tasks()
        final = dict(self.strategy.current)
        self._evaluate_final(final)
        return final

    def _step(self) -> None:
        """Take in ended tasks, expire late ones, hand out new ones, commit."""
        ended = self.transport.wait_for_ended(self._wait_seconds())
        now = time.monotonic()
        sites = set(self.transport.site_ids())
        for task in list(self.state.tasks.values()):
            if task.task in ended:
                continue
            if task.site not in sites:
                reason = "the site was revoked"
            elif task.deadline <= now:
                reason = self._late_reason()
            else:
                continue
            if self.transport.expire_task(task.task, reason):
                ended.append(task.task)
        for number in ended:
            self._take(number)
        fresh = self._dispatch()
        self._commit()
        for number in ended:
            self.transport.close_task(number)
            self._drop_update_files(number)
        for task in fresh:
            self._open(task)
        self._collect_evaluations()
        if self.state.ended < self.budget and not self.state.tasks and \
                not self._eligible(include_waiting=True):
            raise PriFedError(
                f"async: no site can take a task ({self.state.ended} of "
                f"{self.budget} tasks done): every site is revoked or was left out "
                "after repeated failures; the state is kept, so fix the sites and "
                "start the coordinator again")

    def _wait_seconds(self) -> float:
        """Return how long to wait for replies: until a deadline or a site's wait."""
        if self._eligible() and self._room() > 0:
            return 0.0
        now = time.monotonic()
        times = [t.deadline for t in self.state.tasks.values()]
        times += [t for s, t in self._not_before.items()
                  if s not in self.state.tasks and t > now]
        if not times:
            return 1.0
        return max(0.0, min(min(times) - now, 5.0))

    def _room(self) -> int:
        limit = self.config.training.sites_per_round or len(self.transport.participants)
        return min(limit - len(self.state.tasks),
                   self.budget - self.state.ended - len(self.state.tasks))

    def _eligible(self, include_waiting: bool = False) -> list[str]:
        """List idle sites that may get a task, least recently served first."""
        now = time.monotonic()
        idle = [s for s in self.transport.site_ids()
                if s not in self.state.tasks and s not in self.state.left_out
                and (include_waiting or self._not_before.get(s, 0.0) <= now)]
        idle.sort(key=lambda s: self.state.dispatched.get(s, 0))
        return idle

    def _late_reason(self) -> str:
        return (f"no reply before the deadline "
                f"({self.config.rounds.deadline_seconds:g} s)")

    def _take(self, number: int) -> None:
        """Give one ended task's reply (or failure) to FedBuff."""
        task = next((t for t in self.state.tasks.values() if t.task == number), None)
        if task is None:
            return
        result = self.transport.task_result(number)
        del self.state.tasks[task.site]
        self.state.ended += 1
        progress = f"{self.state.ended} of {self.budget} tasks done"
        if isinstance(result, Failure):
            self.strategy.cancel(task.site)
            self._drop(task, result.reason)
            logger.warning("async task %d: site %s failed: %s (%s)", number,
                           task.site, redact(result.reason), progress)
            if result.reason.startswith(REPORTED_FAILURE):
                self._site_failed(task.site)
            return

        self.state.failures.pop(task.site, None)
        self._not_before.pop(task.site, None)
        before = self.strategy.version
        try:
            new_model = self.strategy.submit(replace(result,
                                                     server_round=task.version))
        except UpdateRejected as error:
            self._drop(task, f"rejected: {error.reason}")
            logger.warning("async task %d: %s (%s)", number, redact(str(error)),
                           progress)
            return
        if new_model is None and self.strategy.buffer is not None and \
                self.strategy.buffer.count == len(self.state.buffered):
            # FedBuff leaves out an update of 0 samples, so it is not recorded.
            return

        self.state.buffered.append({"site": task.site, "task": number,
                                    "version": task.version,
                                    "staleness": before - task.version,
                                    "num_samples": result.num_samples,
                                    "metrics": wire.to_json(result.metrics)})
        logger.info("async task %d: update from site %s, staleness %d, buffer %d/%d "
                    "(%s)", number, task.site, before - task.version,
                    len(self.state.buffered), self.strategy.buffer_size, progress)
        if new_model is not None:
            self._publish_version(new_model)

    def _drop(self, task: OpenTask, reason: str) -> None:
        self.state.dropped.append({"site": task.site, "task": task.task,
                                   "version": task.version,
                                   "reason": redact(reason, 300)})

    def _site_failed(self, site: str) -> None:
        """Make a site that reported a failure wait, or leave it out after many."""
        count = self.state.failures.get(site, 0) + 1
        self.state.failures[site] = count
        if count >= self.config.rounds.attempts:
            self.state.left_out.append(site)
            logger.warning("async: site %s reported %d failures in a row; it gets no "
                           "more tasks in this run", site, count)
            return
        wait = min(2.0 ** (count - 1), self.config.rounds.deadline_seconds)
        self._not_before[site] = time.monotonic() + wait
        logger.info("async: site %s gets its next task in %g s (failure %d of %d "
                    "allowed in a row)", site, wait, count,
                    self.config.rounds.attempts)

    def _publish_version(self, params: ParameterSet) -> None:
        version = self.strategy.version
        path, digest = self.models.publish(version, params)
        record = {"version": version, "updates": self.state.buffered,
                  "dropped": self.state.dropped, "tasks_done": self.state.ended,
                  "seconds": round(self._elapsed(), 3), "eval_metrics": {}}
        self.state.buffered = []
        self.state.dropped = []
        self.store.commit_model(ModelRow(
            version=version, path=str(path), sha256=digest, strategy_state="{}",
            strategy_arrays=None, rng_state="{}", created_at=time.time()), None)
        self.store.set_meta(f"{RECORD_PREFIX}{version:06d}", record)
        if version % self.config.training.evaluate_every == 0:
            self._post_evaluation(version, params)
        staleness = [u["staleness"] for u in record["updates"]]
        logger.info("async: model version %d from %d updates (sites %s, staleness "
                    "max %d) after %d of %d tasks", version, len(staleness),
                    ", ".join(u["site"] for u in record["updates"]), max(staleness),
                    self.state.ended, self.budget)
        if self.on_version is not None:
            self.on_version(record)

    def _dispatch(self) -> list[OpenTask]:
        """Hand a task to each idle site, oldest-served first, within the limits."""
        fresh = []
        for site in self._eligible()[:max(self._room(), 0)]:
            instruction, _ = self.strategy.dispatch(site)
            number = self.state.next_task
            self.state.next_task += 1
            self.state.dispatched[site] = number
            task = OpenTask(number, site, instruction.server_round,
                            time.monotonic() + self.config.rounds.deadline_seconds)
            self.state.tasks[site] = task
            fresh.append(task)
        return fresh

    def _open(self, task: OpenTask) -> None:
        instruction = TrainInstruction(task.site, task.task,
                                       dict(self.strategy.local_config))
        self.transport.open_task(task.task, instruction, task.version,
                                 self.strategy.versions[task.version])

    def _close_stale_tasks(self) -> None:
        """Close the tasks that ended in the committed state but not in the store.

        A coordinator stopped between a commit and closing its ended tasks
        leaves them open in the database, with their update files on disk.
        """
        open_tasks = {t.task for t in self.state.tasks.values()}
        for row in self.store.rounds():
            if row["status"] == "open" and row["number"] not in open_tasks:
                self.transport.close_task(row["number"])
                self._drop_update_files(row["number"])

    def _reopen_tasks(self) -> None:
        """Post again the tasks that were open when the state was committed."""
        for task in self.state.tasks.values():
            task.deadline = time.monotonic() + self.config.rounds.deadline_seconds
            self._open(task)

    def _close_open_tasks(self) -> None:
        for task in list(self.state.tasks.values()):
            self.transport.close_task(task.task)
            self.strategy.cancel(task.site)
        if self.state.tasks:
            logger.info("async: task budget spent; %d open tasks withdrawn",
                        len(self.state.tasks))
        self.state.tasks = {}
        self._commit()

    def _post_evaluation(self, version: int, params: Mapping[str, np.ndarray]
                         ) -> None:
        if version not in self.state.evaluating:
            self.state.evaluating.append(version)
        self.transport.post_evaluation(version, params, self.transport.site_ids(),
                                       label=f"model version {version}")

    def _repost_evaluations(self) -> None:
        """Post again the evaluations that were open when the state was committed."""
        names = self.store.get_meta("param_names")
        for version in list(self.state.evaluating):
            params = params_from_bytes(self.models.path(version).read_bytes(),
                                       order=names)
            self._post_evaluation(version, params)

    def _collect_evaluations(self) -> dict[int, dict[str, dict[str, float]]]:
        """Close finished evaluations, add them to their records and return them."""
        collected = {}
        for version in self.transport.finished_evaluations():
            if version not in self.state.evaluating:
                continue
            replies = self.transport.close_evaluation(version,
                                                      self.transport.site_ids())
            metrics = {r.site: dict(r.metrics) for r in replies
                       if isinstance(r, EvaluateReply)}
            collected[version] = metrics
            self.state.evaluating.remove(version)
            key = f"{RECORD_PREFIX}{version:06d}"
            record = self.store.get_meta(key)
            if record is not None:
                record["eval_metrics"] = wire.to_json(metrics)
                self.store.set_meta(key, record)
            logger.info("async: model version %d has mean accuracy %.3f over %d "
                        "sites", version, _mean_accuracy(metrics), len(metrics))
        if collected:
            self._commit()
        return collected

    def _evaluate_final(self, params: ParameterSet) -> None:
        """Evaluate the final version and wait for the evaluations still open."""
        version = self.strategy.version
        if version not in self.state.evaluating:
            self._post_evaluation(version, params)
            self._commit()
        metrics: dict[str, dict[str, float]] = {}
        while self.state.evaluating:
            self.transport.wait_for_ended(0.5)
            metrics = self._collect_evaluations().get(version, metrics)
        # Updates still in a partly filled buffer are listed, not applied.
        record = {"version": version, "updates": [], "unapplied": self.state.buffered,
                  "dropped": self.state.dropped,
                  "left_out": self.state.left_out, "tasks_done": self.state.ended,
                  "seconds": round(self._elapsed(), 3),
                  "eval_metrics": wire.to_json(metrics), "final": True}
        self.store.set_meta(f"{RECORD_PREFIX}final", record)
        logger.info("async: final model version %d, mean accuracy %.3f over %d sites",
                    version, _mean_accuracy(metrics), len(metrics))

    # Durable state.

    def _elapsed(self) -> float:
        return self.state.elapsed + time.monotonic() - self._clock_start

    def _commit(self) -> None:
        """Commit FedBuff's state and the run's state in one database write."""
        strategy_state = self.strategy.state_dict()
        versions = sorted(int(v) for v in strategy_state.pop("versions"))
        values, arrays = wire.state_to_parts(strategy_state)
        count = self.strategy.buffer.count if self.strategy.buffer is not None else 0
        mark = (self.strategy.version, count)
        if arrays and (mark != self._buffer_mark or self._arrays_path is None):
            folder = self.config.state_dir / "models"
            path = folder / f"buffer-v{mark[0]:04d}-n{mark[1]:03d}.safetensors"
            write_atomic(path, params_to_bytes(arrays))
            old, self._arrays_path = self._arrays_path, str(path)
            self._buffer_mark = mark
        else:
            old = None
        state = self.state
        document = {
            "strategy": values, "arrays": self._arrays_path, "versions": versions,
            "next_task": state.next_task, "ended": state.ended,
            "tasks": {s: [t.task, t.version] for s, t in state.tasks.items()},
            "dispatched": state.dispatched, "buffered": state.buffered,
            "evaluating": state.evaluating, "dropped": state.dropped,
            "failures": state.failures, "left_out": state.left_out,
            "elapsed": self._elapsed()}
        self.store.set_meta(STATE_KEY, document)
        if old is not None and old != self._arrays_path:
            Path(old).unlink(missing_ok=True)

    def _restore(self) -> bool:
        document = self.store.get_meta(STATE_KEY)
        if document is None:
            return False
        arrays: dict[str, np.ndarray] = {}
        if document["arrays"]:
            arrays = params_from_bytes(Path(document["arrays"]).read_bytes())
        strategy_state = wire.state_from_parts(document["strategy"], arrays)
        names = self.store.get_meta("param_names")
        strategy_state["versions"] = {
            str(v): params_from_bytes(self.models.path(v).read_bytes(), order=names)
            for v in document["versions"]}
        self.strategy.load_state_dict(strategy_state)

        self._arrays_path = document["arrays"]
        buffer = self.strategy.buffer
        self._buffer_mark = (self.strategy.version,
                             buffer.count if buffer is not None else 0)
        self.state = BufferedState(
            next_task=int(document["next_task"]), ended=int(document["ended"]),
            tasks={s: OpenTask(int(t[0]), s, int(t[1]))
                   for s, t in document["tasks"].items()},
            dispatched={s: int(n) for s, n in document["dispatched"].items()},
            buffered=list(document["buffered"]),
            evaluating=[int(v) for v in document.get("evaluating", [])],
            dropped=list(document.get("dropped", [])),
            # A restart gives every site a new chance: it is how an operator
            # brings back sites that were left out after repeated failures.
            failures={}, left_out=[],
            elapsed=float(document["elapsed"]))
        self._clock_start = time.monotonic()

        for task in self.state.tasks.values():
            if self.strategy.outstanding.get(task.site) != task.version:
                raise ProtocolError(f"async state: site {task.site!r} has task "
                                    f"{task.task} on version {task.version}, which "
                                    "FedBuff's saved state does not list")
        if document.get("left_out"):
            logger.info("async: sites %s were left out before the restart and get "
                        "tasks again", ", ".join(document["left_out"]))
        logger.info("async: resuming with %d open tasks at model version %d",
                    len(self.state.tasks), self.strategy.version)
        return True

    def _drop_update_files(self, task: int) -> None:
        if self.config.coordinator.keep_updates:
            return
        folder = self.config.state_dir / "updates" / f"round-{task:04d}"
        for item in folder.glob("*"):
            item.unlink()
        if folder.exists():
            folder.rmdir()


def _mean_accuracy(metrics: Mapping[str, Mapping[str, Any]]) -> float:
    values = [float(m["accuracy"]) for m in metrics.values()
              if m.get("accuracy") is not None]
    return float(np.mean(values)) if values else math.nan


def load_records(store: Store) -> list[dict[str, Any]]:
    """Return an asynchronous run's version records, the final evaluation last."""
    items = store.meta_items(RECORD_PREFIX)
    records = [value for key, value in items if not key.endswith("final")]
    records += [value for key, value in items if key.endswith("final")]
    return records

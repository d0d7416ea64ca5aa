"""Simulated time: site speeds and availability, synchronous and asynchronous runs.

Time here is simulated seconds, not the time the simulation takes. A task of
``k`` local steps at a site of speed ``s`` lasts ``k * step_seconds / s``, so
only ratios between sites matter. Availability cuts time into windows of
``window_seconds``; in each window a site is online with probability
``availability``, drawn from a generator seeded by the run seed, the site's
index and the window, so every run with the same seed gets the same
schedule. A site starts a task only while online and, once started, finishes
it (a site going offline mid-task is not modelled).

Evaluation is an oracle measurement outside simulated time: every site's test
set is scored after each server update, whether the site is online or not.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from prifed.core.messages import EvaluateReply, Failure, TrainInstruction, TrainReply
from prifed.core.params import ParameterSet
from prifed.core.transport import Transport
from prifed.errors import ConfigError, UpdateRejected
from prifed.log import get_logger, redact
from prifed.strategies.fedbuff import FedBuff
from prifed.training.local import DEFAULT_LOCAL_STEPS

logger = get_logger(__name__)

# Give up looking for an online window after this many, so a site that is
# (almost) never online cannot stall a run.
_MAX_WAIT_WINDOWS = 100_000


@dataclass(frozen=True)
class SiteProfile:
    """A site's relative training speed and its share of online time windows.

    Speed 1.0 is nominal and 0.1 ten times slower; availability 0.5 means the
    site is online in about half of the windows.
    """

    speed: float = 1.0
    availability: float = 1.0

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ConfigError(f"site speed must be positive; got {self.speed}")
        if not 0 < self.availability <= 1:
            raise ConfigError("site availability must be in (0, 1]; got "
                              f"{self.availability}")


class SiteTimeline:
    """Task durations and online windows of every site, deterministic by seed."""

    def __init__(self, sites: Sequence[str],
                 profiles: Mapping[str, SiteProfile] | None = None,
                 step_seconds: float = 0.01, window_seconds: float = 1.0,
                 seed: int = 0) -> None:
        profiles = dict(profiles or {})
        unknown = [s for s in profiles if s not in sites]
        if unknown:
            raise ConfigError(f"site profile given for unknown site {unknown[0]!r}; "
                              f"sites are {', '.join(sites)}")
        if not step_seconds > 0 or not window_seconds > 0:
            raise ConfigError("step_seconds and window_seconds must be positive; got "
                              f"{step_seconds} and {window_seconds}")
        self.sites = list(sites)
        self.profiles = {s: profiles.get(s, SiteProfile()) for s in self.sites}
        self.step_seconds = step_seconds
        self.window_seconds = window_seconds
        self.seed = seed

    def duration(self, site: str, steps: int) -> float:
        """Return the simulated seconds one task of ``steps`` steps takes at a site."""
        return steps * self.step_seconds / self.profiles[site].speed

    def is_online(self, site: str, time: float) -> bool:
        """Tell whether a site is online at a simulated time."""
        availability = self.profiles[site].availability
        if availability >= 1:
            return True
        window = int(math.floor(time / self.window_seconds))
        draw = np.random.default_rng(
            [self.seed, self.sites.index(site), window]).random()
        return bool(draw < availability)

    def next_online(self, site: str, time: float) -> float:
        """Return the first simulated time at or after ``time`` the site is online."""
        if self.is_online(site, time):
            return time
        window = int(math.floor(time / self.window_seconds))
        for later in range(window + 1, window + _MAX_WAIT_WINDOWS):
            start = later * self.window_seconds
            if self.is_online(site, start):
                return start
        raise ConfigError(f"site {site!r} was offline for {_MAX_WAIT_WINDOWS} "
                          "windows in a row; raise its availability")


@dataclass
class SimulatedClock:
    """The simulated time of a run, in seconds."""

    now: float = 0.0


class TimedTransport:
    """A transport that runs rounds in simulated time for the round engine.

    ``site_ids`` lists the sites online now and, when none is, waits until one
    comes online. A round lasts as long as its slowest selected site, so the
    clock advances by that much when the round's replies are collected.
    """

    def __init__(self, inner: Transport, timeline: SiteTimeline,
                 clock: SimulatedClock | None = None) -> None:
        self.inner = inner
        self.timeline = timeline
        self.clock = clock or SimulatedClock()

    def site_ids(self) -> list[str]:
        online = self._online(self.clock.now)
        if not online:
            self.clock.now = min(self.timeline.next_online(s, self.clock.now)
                                 for s in self.inner.site_ids())
            online = self._online(self.clock.now)
        return online

    def _online(self, time: float) -> list[str]:
        return [s for s in self.inner.site_ids() if self.timeline.is_online(s, time)]

    def train(self, server_round: int, params: Mapping[str, np.ndarray],
              instructions: Sequence[TrainInstruction]
              ) -> Iterator[TrainReply | Failure]:
        longest = max((self.timeline.duration(i.site, _steps(i)) for i in instructions),
                      default=0.0)
        self.clock.now += longest
        return self.inner.train(server_round, params, instructions)

    def evaluate(self, server_round: int, params: Mapping[str, np.ndarray],
                 sites: Sequence[str]) -> list[EvaluateReply | Failure]:
        # Oracle measurement: every site is scored, online or not.
        return self.inner.evaluate(server_round, params, self.inner.site_ids())


def _steps(instruction: TrainInstruction) -> int:
    return int(instruction.config.get("local_steps", DEFAULT_LOCAL_STEPS))


@dataclass
class AsyncRecord:
    """One server update of an asynchronous run, at its simulated time."""

    version: int
    time: float
    tasks_done: int
    sites: list[str]
    staleness: list[int]
    eval_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    train_seconds: float = 0.0
    """Wall-clock seconds of local training so far, summed over sites."""


@dataclass(order=True)
class _Event:
    time: float
    order: int
    site: str = field(compare=False)
    reply: TrainReply | Failure | None = field(compare=False, default=None)


def run_async(strategy: FedBuff, transport: Transport, timeline: SiteTimeline,
              params: Mapping[str, np.ndarray], trainable: Iterable[str],
              max_tasks: int,
              on_update: Callable[[AsyncRecord], None] | None = None
              ) -> tuple[ParameterSet, list[AsyncRecord]]:
    """Run FedBuff in simulated time until ``max_tasks`` site tasks have finished.

    Each site takes a new task as soon as it is online and idle, trains from
    the model current at that moment, and delivers its reply when the task's
    simulated duration has passed. Replies are submitted in order of arrival.
    Returns the final model and one record per server update.
    """
    if max_tasks < 1:
        raise ConfigError(f"max_tasks must be at least 1; got {max_tasks}")
    strategy.start(params, trainable)
    sites = transport.site_ids()
    events: list[_Event] = []
    counter = 0
    for site in sites:
        heapq.heappush(events, _Event(timeline.next_online(site, 0.0), counter, site))
        counter += 1
    history: list[AsyncRecord] = []
    done = 0
    train_seconds = 0.0
    while events and done < max_tasks:
        event = heapq.heappop(events)
        if event.reply is None:
            instruction, model = strategy.dispatch(event.site)
            reply = next(iter(transport.train(instruction.server_round, model,
                                              [instruction])))
            if isinstance(reply, TrainReply):
                train_seconds += reply.metrics.get("train_seconds", 0.0)
            finish = event.time + timeline.duration(event.site, _steps(instruction))
            heapq.heappush(events, _Event(finish, counter, event.site, reply))
            counter += 1
            continue
        done += 1
        new_model = _deliver(strategy, event.reply)
        if new_model is not None:
            record = AsyncRecord(strategy.version, event.time, done,
                                 list(strategy.last_applied["sites"]),
                                 list(strategy.last_applied["staleness"]),
                                 train_seconds=train_seconds)
            record.eval_metrics = _evaluate(transport, strategy.version, new_model,
                                            sites)
            history.append(record)
            if on_update is not None:
                on_update(record)
        restart = timeline.next_online(event.site, event.time)
        heapq.heappush(events, _Event(restart, counter, event.site))
        counter += 1
    return dict(strategy.current), history


def _deliver(strategy: FedBuff, reply: TrainReply | Failure) -> ParameterSet | None:
    if isinstance(reply, Failure):
        strategy.cancel(reply.site)
        logger.warning("async: site %s failed: %s", reply.site, redact(reply.reason))
        return None
    try:
        return strategy.submit(reply)
    except UpdateRejected as error:
        logger.warning("async: %s", redact(str(error)))
        return None


def _evaluate(transport: Transport, version: int, params: Mapping[str, np.ndarray],
              sites: Sequence[str]) -> dict[str, dict[str, float]]:
    metrics = {}
    for reply in transport.evaluate(version, params, sites):
        if isinstance(reply, EvaluateReply):
            metrics[reply.site] = dict(reply.metrics)
        else:
            logger.warning("evaluate version %d: site %s failed: %s", version,
                           reply.site, redact(reply.reason))
    return metrics


def time_to_target(times: Sequence[float], values: Sequence[float],
                   target: float) -> float | None:
    """Return the first time a value reaches ``target``, or None if it never does."""
    for time, value in zip(times, values, strict=True):
        if value >= target:
            return float(time)
    return None

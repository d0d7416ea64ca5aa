"""FedBuff (Nguyen et al., AISTATS 2022): asynchronous aggregation over a buffer.

Sites train whenever they can, each from the global model as it was when it
took its task (its *version*). The coordinator adds each reply to a buffer as
it arrives and, once the buffer has ``buffer_size`` replies, moves the
current model x and clears the buffer. A reply built on version ``v`` while
the model is at version ``t`` has staleness ``t - v`` and weight
``s = (1 + staleness) ** -staleness_exponent`` (0.5 gives the paper's
``1 / sqrt(1 + staleness)``). With sample counts n_i:

    trainable float tensors:  x = x + server_lr * sum(s_i n_i (y_i - x_v_i)) / sum(n_i)
    every other tensor:       x = sum(s_i n_i y_i) / sum(s_i n_i)

So a reply counts as its change against the model it started from, stale
replies count less, and buffers (batch-norm statistics, integer counters)
take a weighted mean exactly as in the synchronous path, cast back to each
tensor's dtype.

How a coordinator drives it (the same calls in simulation and deployment):

1. ``start(params, trainable)`` once, with the initial model;
2. when a site asks for work: ``instruction, model = dispatch(site)``; the
   instruction's ``server_round`` is the model version the site trains from
   and its reply must echo it;
3. when a reply arrives: ``submit(reply)``. It validates the reply against
   the version the site started from (raising UpdateRejected), and returns
   the new global model when the buffer filled, else None;
4. when a site's task is abandoned (timeout, disconnect): ``cancel(site)``.

A site has at most one task: dispatching to a site that still holds one
cancels the earlier one. The coordinator keeps one copy of the model per
version that some site still trains from, so memory grows with the number of
sites, not with time. In the synchronous round engine (``aggregate_train``)
every reply has staleness 0 and FedBuff is FedAvg with a server learning rate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from prifed.core.aggregate import cast_like
from prifed.core.messages import TrainInstruction, TrainReply
from prifed.core.params import ParameterSet, copy_params, validate_update
from prifed.core.strategy import MeanAggregator, Strategy
from prifed.errors import ConfigError, UpdateRejected
from prifed.log import get_logger
from prifed.strategies.base import apply_server_step, require_positive, stepped_names

logger = get_logger(__name__)


class UpdateBuffer:
    """Staleness-weighted sums of the replies waiting for the next server step."""

    def __init__(self, reference: Mapping[str, np.ndarray], stepped: Iterable[str]
                 ) -> None:
        names = frozenset(stepped)
        self.change_sums = {n: np.zeros(v.shape) for n, v in reference.items()
                            if n in names}
        self.value_sums = {n: np.zeros(v.shape) for n, v in reference.items()
                           if n not in names}
        self.sample_weight = 0.0
        self.value_weight = 0.0
        self.staleness: list[int] = []
        self.sites: list[str] = []

    @property
    def count(self) -> int:
        return len(self.staleness)

    def add(self, reply: TrainReply, base: Mapping[str, np.ndarray],
            staleness: int, weight: float) -> None:
        """Add one reply, as its change against ``base``, with staleness weight."""
        samples = float(reply.num_samples)
        for name, total in self.change_sums.items():
            change = (reply.params[name].astype(np.float64)
                      - base[name].astype(np.float64))
            total += weight * samples * change
        for name, total in self.value_sums.items():
            total += weight * samples * reply.params[name].astype(np.float64)
        self.sample_weight += samples
        self.value_weight += weight * samples
        self.staleness.append(staleness)
        self.sites.append(reply.site)

    def apply(self, current: Mapping[str, np.ndarray], server_lr: float
              ) -> ParameterSet:
        """Return the model after one server step from ``current``."""
        result = copy_params(current)
        for name, total in self.value_sums.items():
            result[name] = cast_like(total / self.value_weight, current[name].dtype)
        steps = {name: server_lr * total / self.sample_weight
                 for name, total in self.change_sums.items()}
        return apply_server_step(current, result, steps)

    def state_dict(self) -> dict[str, Any]:
        return {"change_sums": {n: v.copy() for n, v in self.change_sums.items()},
                "value_sums": {n: v.copy() for n, v in self.value_sums.items()},
                "sample_weight": self.sample_weight,
                "value_weight": self.value_weight,
                "staleness": list(self.staleness), "sites": list(self.sites)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.change_sums = {n: np.array(v, np.float64)
                            for n, v in state["change_sums"].items()}
        self.value_sums = {n: np.array(v, np.float64)
                           for n, v in state["value_sums"].items()}
        self.sample_weight = float(state["sample_weight"])
        self.value_weight = float(state["value_weight"])
        self.staleness = [int(s) for s in state["staleness"]]
        self.sites = [str(s) for s in state["sites"]]


class FedBuff(Strategy):
    """Buffered asynchronous aggregation with staleness-weighted replies."""

    name = "fedbuff"
    # Each reply is weighted by its own staleness and compared with the model
    # version it started from, so replies cannot be summed blindly.
    needs_individual_updates = True

    def __init__(self, sites_per_round: int | None = None,
                 local_config: Mapping[str, Any] | None = None,
                 buffer_size: int = 2, server_lr: float = 1.0,
                 staleness_exponent: float = 0.5,
                 max_staleness: int | None = None) -> None:
        super().__init__(sites_per_round, local_config)
        if int(buffer_size) < 1:
            raise ConfigError(f"buffer_size must be at least 1; got {buffer_size!r}")
        if not float(staleness_exponent) >= 0:
            raise ConfigError("staleness_exponent must be at least 0; got "
                              f"{staleness_exponent!r}")
        if max_staleness is not None and int(max_staleness) < 0:
            raise ConfigError("max_staleness must be at least 0; got "
                              f"{max_staleness!r}")
        self.buffer_size = int(buffer_size)
        self.server_lr = require_positive("server_lr", server_lr)
        self.staleness_exponent = float(staleness_exponent)
        self.max_staleness = None if max_staleness is None else int(max_staleness)
        self.version = 0
        self.versions: dict[int, ParameterSet] = {}
        self.outstanding: dict[str, int] = {}
        self.buffer: UpdateBuffer | None = None
        self.last_applied: dict[str, Any] = {}

    # Synchronous path: one server step per round from the replies' mean.

    def finish_aggregation(self, server_round: int,
                           params: Mapping[str, np.ndarray],
                           aggregator: MeanAggregator) -> ParameterSet:
        """Step from the round's mean as a buffer of fresh replies would."""
        mean = aggregator.result()
        steps = {n: self.server_lr * (mean[n].astype(np.float64)
                                      - params[n].astype(np.float64))
                 for n in stepped_names(params, self.trainable)}
        return apply_server_step(params, mean, steps)

    # Asynchronous path: the coordinator's hooks.

    def start(self, params: Mapping[str, np.ndarray], trainable: Iterable[str]
              ) -> None:
        """Set the initial model (version 0) and the trainable tensors."""
        self.initialize(params, trainable)
        self.version = 0
        self.versions = {0: copy_params(params)}
        self.outstanding = {}
        self.buffer = UpdateBuffer(params, stepped_names(params, self.trainable))

    @property
    def current(self) -> ParameterSet:
        """The global model at the current version (read-only by convention)."""
        return self.versions[self._require_started()]

    def dispatch(self, site: str) -> tuple[TrainInstruction, ParameterSet]:
        """Hand a site a task on the current model; return it and the model to send."""
        version = self._require_started()
        if site in self.outstanding:
            logger.info("dispatch: site %s still held a task on version %d; it is "
                        "replaced", site, self.outstanding[site])
        self.outstanding[site] = version
        self._forget_unused_versions()
        instruction = TrainInstruction(site, version, dict(self.local_config))
        return instruction, copy_params(self.versions[version])

    def cancel(self, site: str) -> None:
        """Forget a site's task, for example after a timeout or a failure."""
        self.outstanding.pop(site, None)
        self._forget_unused_versions()

    def submit(self, reply: TrainReply) -> ParameterSet | None:
        """Buffer one reply; return the new global model when the buffer filled.

        Raises UpdateRejected when no task is outstanding for the site at the
        reply's version, or the update fails the checks of the synchronous path. The
        site's task ends either way.
        """
        version = self._require_started()
        started_from = self.outstanding.pop(reply.site, None)
        if started_from is None:
            raise UpdateRejected(reply.site, "no task outstanding for this site")
        base = self.versions[started_from]
        self._forget_unused_versions()
        if reply.server_round != started_from:
            raise UpdateRejected(reply.site, f"reply is for model version "
                                 f"{reply.server_round}; the site's task is on "
                                 f"version {started_from}")
        self._check(reply, base)
        staleness = version - started_from
        if self.max_staleness is not None and staleness > self.max_staleness:
            raise UpdateRejected(reply.site, f"staleness {staleness} exceeds "
                                 f"max_staleness {self.max_staleness}")
        if reply.num_samples == 0:
            logger.warning("submit: site %s trained on 0 samples; left out",
                           reply.site)
            return None
        assert self.buffer is not None
        weight = (1.0 + staleness) ** -self.staleness_exponent
        self.buffer.add(reply, base, staleness, weight)
        logger.debug("submit: site %s, staleness %d, buffer %d/%d", reply.site,
                     staleness, self.buffer.count, self.buffer_size)
        if self.buffer.count < self.buffer_size:
            return None
        return self._apply_buffer()

    def _check(self, reply: TrainReply, base: Mapping[str, np.ndarray]) -> None:
        if not isinstance(reply.num_samples, int) or reply.num_samples < 0:
            raise UpdateRejected(reply.site, "num_samples must be an integer >= 0; "
                                 f"got {reply.num_samples!r}")
        validate_update(reply.site, base, reply.params)
        self.check_reply(reply, base)

    def _apply_buffer(self) -> ParameterSet:
        assert self.buffer is not None
        new = self.buffer.apply(self.current, self.server_lr)
        self.last_applied = {"version": self.version + 1,
                             "sites": list(self.buffer.sites),
                             "staleness": list(self.buffer.staleness)}
        logger.info("aggregate: version %d from %d replies, staleness max %d",
                    self.version + 1, self.buffer.count, max(self.buffer.staleness))
        self.version += 1
        self.versions[self.version] = new
        self.buffer = UpdateBuffer(new, stepped_names(new, self.trainable))
        self._forget_unused_versions()
        return copy_params(new)

    def _forget_unused_versions(self) -> None:
        needed = set(self.outstanding.values()) | {self.version}
        for old in [v for v in self.versions if v not in needed]:
            del self.versions[old]

    def _require_started(self) -> int:
        if not self.versions:
            raise ConfigError("fedbuff: call start() with the initial model before "
                              "dispatching or submitting")
        return self.version

    def state_dict(self) -> dict[str, Any]:
        """Return the versions still in use, the open tasks and the buffer."""
        state: dict[str, Any] = {"trainable": sorted(self.trainable),
                                 "version": self.version,
                                 "outstanding": dict(self.outstanding),
                                 "versions": {str(v): copy_params(p)
                                              for v, p in self.versions.items()}}
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        self.trainable = frozenset(state["trainable"])
        self.version = int(state["version"])
        self.outstanding = {str(s): int(v) for s, v in state["outstanding"].items()}
        self.versions = {int(v): {n: np.array(t) for n, t in p.items()}
                         for v, p in state["versions"].items()}
        self.buffer = None
        if "buffer" in state:
            current = self.versions[self.version]
            self.buffer = UpdateBuffer(current, stepped_names(current, self.trainable))
            self.buffer.load_state_dict(state["buffer"])


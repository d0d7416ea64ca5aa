"""The round engine: drives a strategy and sites through a transport."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from prifed.core.messages import EvaluateReply, Failure, TrainInstruction, TrainReply
from prifed.core.params import ParameterSet, copy_params
from prifed.core.secure_sum import SecureSumTransport
from prifed.core.strategy import Strategy
from prifed.core.transport import Transport
from prifed.errors import UpdateRejected
from prifed.log import get_logger, redact, round_label

logger = get_logger(__name__)


@dataclass
class RoundRecord:
    """Participation, rejections and metrics of one round."""

    server_round: int
    sites: list[str]
    accepted: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    skipped: bool = False
    train_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


class RoundEngine:
    """Run rounds of configure, train, validate, aggregate and evaluate."""

    def __init__(self, strategy: Strategy, transport: Transport, num_rounds: int,
                 seed: int = 0, evaluate_every: int = 1,
                 on_round: Callable[[RoundRecord], None] | None = None) -> None:
        if num_rounds < 1:
            raise ValueError(f"num_rounds must be at least 1; got {num_rounds}")
        self.strategy = strategy
        self.transport = transport
        self.num_rounds = num_rounds
        self.evaluate_every = evaluate_every
        self.on_round = on_round
        self.rng = np.random.default_rng(seed)
        self.history: list[RoundRecord] = []

    def run(self, params: Mapping[str, np.ndarray], trainable: Iterable[str],
            start_round: int = 1) -> ParameterSet:
        """Run rounds ``start_round`` to ``num_rounds``; return the final model."""
        current = copy_params(params)
        if start_round == 1:
            self.strategy.initialize(current, trainable)
        for server_round in range(start_round, self.num_rounds + 1):
            current = self.run_round(server_round, current)
        return current

    def run_round(self, server_round: int,
                  params: Mapping[str, np.ndarray]) -> ParameterSet:
        """Run one round and return the global model after it."""
        started = time.perf_counter()
        label = round_label(server_round, self.num_rounds)
        instructions = self.strategy.configure_train(
            server_round, params, self.transport.site_ids(), self.rng)
        record = RoundRecord(server_round, [i.site for i in instructions])
        logger.info("fit %s: sampled %d sites (%s)", label, len(instructions),
                    ", ".join(record.sites))

        if isinstance(self.transport, SecureSumTransport):
            new_params = self._train_secure(label, server_round, params,
                                            instructions, record)
        else:
            replies = self.transport.train(server_round, params, instructions)
            accepted = self._screen(label, params, replies, record)
            new_params = self.strategy.aggregate_train(server_round, params, accepted)
        if new_params is None:
            record.skipped = True
            new_params = copy_params(params)
            logger.warning("fit %s: total sample weight is zero (%d replies, "
                           "%d failures); round skipped, previous model kept",
                           label, len(record.accepted), len(record.failures))
        logger.info("fit %s: aggregated %d replies, %d failures, %d rejected",
                    label, len(record.accepted), len(record.failures),
                    len(record.rejected))

        if server_round % self.evaluate_every == 0 or server_round == self.num_rounds:
            self._evaluate(server_round, new_params, record)
        record.seconds = time.perf_counter() - started
        logger.info("%s done in %.3f s", label, record.seconds)
        self.history.append(record)
        if self.on_round is not None:
            self.on_round(record)
        return new_params

    def _train_secure(self, label: str, server_round: int,
                      params: Mapping[str, np.ndarray],
                      instructions: Sequence[TrainInstruction],
                      record: RoundRecord) -> ParameterSet | None:
        """Train through a private sum, so the engine never sees one update."""
        assert isinstance(self.transport, SecureSumTransport)
        outcome = self.transport.train_secure(server_round, params, instructions)
        for site, reason in outcome.failures.items():
            record.failures[site] = reason
            logger.warning("fit %s: site %s failed: %s", label, site, redact(reason))
        record.accepted.extend(outcome.metrics)
        record.train_metrics.update(outcome.metrics)
        if outcome.private_sum is None:
            record.skipped = True
            logger.error("fit %s: %s", label, redact(outcome.aborted))
            return copy_params(params)
        return self.strategy.aggregate_sum(server_round, params, outcome.private_sum)

    def _screen(self, label: str, params: Mapping[str, np.ndarray],
                replies: Iterable[TrainReply | Failure],
                record: RoundRecord) -> Iterator[TrainReply]:
        """Yield the replies that pass validation, recording the others."""
        expected = set(record.sites)
        for reply in replies:
            if isinstance(reply, Failure):
                record.failures[reply.site] = reply.reason
                logger.warning("fit %s: site %s failed: %s", label, reply.site,
                               redact(reply.reason))
                continue
            try:
                self._check_reply(reply, params, expected, record)
                self.strategy.check_update(reply, params)
                self.strategy.check_reply(reply, params)
            except UpdateRejected as error:
                record.rejected[reply.site] = error.reason
                logger.warning("fit %s: %s", label, redact(str(error)))
                continue
            record.accepted.append(reply.site)
            record.train_metrics[reply.site] = dict(reply.metrics)
            if reply.num_samples == 0:
                logger.warning("fit %s: site %s trained on 0 samples; left out",
                               label, reply.site)
                continue
            yield reply

    @staticmethod
    def _check_reply(reply: TrainReply, params: Mapping[str, np.ndarray],
                     expected: set[str], record: RoundRecord) -> None:
        if reply.site not in expected:
            raise UpdateRejected(reply.site, "site was not selected this round")
        if reply.site in record.accepted:
            raise UpdateRejected(reply.site, "second reply in the same round")
        if not isinstance(reply.num_samples, int) or reply.num_samples < 0:
            raise UpdateRejected(reply.site, "num_samples must be an integer >= 0; "
                                 f"got {reply.num_samples!r}")

    def _evaluate(self, server_round: int, params: Mapping[str, np.ndarray],
                  record: RoundRecord) -> None:
        sites: Sequence[str] = self.transport.site_ids()
        for reply in self.transport.evaluate(server_round, params, sites):
            if isinstance(reply, EvaluateReply):
                record.eval_metrics[reply.site] = dict(reply.metrics)
                logger.info("evaluate %s: site %s, %d test rows, accuracy %.3f",
                            round_label(server_round, self.num_rounds), reply.site,
                            reply.num_samples,
                            reply.metrics.get("accuracy", float("nan")))
            else:
                logger.warning("evaluate %s: site %s failed: %s",
                               round_label(server_round, self.num_rounds),
                               reply.site, redact(reply.reason))

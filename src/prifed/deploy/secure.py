"""Secure aggregation in a deployed federation: the coordinator relays, sites mask.

With ``training.secure_aggregation`` set to ``secagg`` or ``secagg+``, no site
uploads its update. A round runs as exchanges (see
:meth:`prifed.deploy.transport.NetworkTransport.exchange`):

1. channel ``secagg-train``: each selected site downloads the round's model,
   trains on it, keeps the update in memory and replies with its training
   metrics only;
2. channel ``secagg``: one exchange per protocol phase (advertise keys, share
   keys, masked input, unmask). The coordinator relays the framed messages of
   :class:`~prifed.secagg.server.SecAggServer` to each site's
   :class:`~prifed.secagg.client.SecAggClient` and back. When a phase's
   deadline passes, ``close_phase`` declares the silent sites dropped.

The round engine then receives only the private sum, as in
``prifed simulate --secure-aggregation``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from prifed.core.messages import Failure, TrainInstruction
from prifed.core.params import ParameterSet, copy_params
from prifed.core.secure_sum import (
    Combiner,
    Message,
    MessageRejected,
    PrivateSum,
    PrivateSumAborted,
    WrappedSecureTransport,
    SecureRound,
    pack_message,
    unpack_message,
)
from prifed.deploy import wire
from prifed.deploy.config import FederationConfig
from prifed.deploy.errors import RequestRejected
from prifed.deploy.transport import NetworkTransport
from prifed.errors import ConfigError, NotSupportedError, PriFedError, \
    ProtocolError, UpdateRejected
from prifed.log import get_logger, redact, round_label
from prifed.secagg.client import SecAggClient
from prifed.secagg.config import MIN_SITES, SecAggConfig
from prifed.secagg.driver import SecAggBackend
from prifed.secagg.transport import check_strategy

if TYPE_CHECKING:
    from prifed.deploy.agent import SiteAgent

logger = get_logger(__name__)

TRAIN_CHANNEL = "secagg-train"
SECURE_EXCHANGE_PREFIX = "secagg-"
"""Start of the id of every secure-aggregation exchange (``secagg-ROUND-TOKEN``)."""
PHASE_CHANNEL = "secagg"
LEFT = "left"
"""Phase of a reply by which a site leaves the round (no update, bad request)."""


def check_secure_settings(config: FederationConfig, strategy: object | None) -> None:
    """Raise at coordinator start-up when secure aggregation cannot serve the run.

    NotSupportedError for a strategy that needs each site's update, and
    ConfigError when fewer than three sites would take part in a round.
    """
    mode = config.training.secure_aggregation
    if mode == "off":
        return
    if strategy is None:
        from prifed.strategies import STRATEGIES

        name = config.training.strategy.lower()
        if name not in STRATEGIES:
            raise ConfigError(f"training.strategy must be one of "
                              f"{', '.join(sorted(STRATEGIES))}; got {name!r}")
        strategy = STRATEGIES[name]
    check_strategy(mode, strategy)
    sites = len(config.federation.sites)
    per_round = min(config.training.sites_per_round or sites, sites)
    if per_round < MIN_SITES:
        raise ConfigError(f"training.secure_aggregation = {mode!r} needs at least "
                          f"{MIN_SITES} sites per round; got {per_round}")


def secure_network_transport(config: FederationConfig, strategy: object,
                             inner: NetworkTransport,
                             reference: Mapping[str, np.ndarray]
                             ) -> NetworkTransport | SecureNetworkTransport:
    """Return ``inner`` or, with secure aggregation on, a checked secure wrapper."""
    mode = config.training.secure_aggregation
    if mode == "off":
        return inner
    check_secure_settings(config, strategy)
    backend = SecAggBackend(SecAggConfig(mode=mode))
    sites = len(inner.site_ids())
    per_round = min(config.training.sites_per_round or sites, sites)
    backend.check(per_round, reference)
    logger.info("secure aggregation %s: %d sites per round, threshold %s, phase "
                "deadline %g s", mode, per_round, backend.config.threshold,
                config.rounds.phase_deadline_seconds)
    return SecureNetworkTransport(inner, backend)


class SecureNetworkTransport(WrappedSecureTransport):
    """Network transport that delivers each round as a secure-aggregation sum."""

    def __init__(self, inner: NetworkTransport, backend: SecAggBackend) -> None:
        super().__init__(inner)
        self.inner: NetworkTransport = inner
        self.backend = backend

    def train_secure(self, server_round: int, params: Mapping[str, np.ndarray],
                     instructions: Sequence[TrainInstruction]) -> SecureRound:
        """Have the sites train, then relay one secure aggregation of their updates."""
        inner = self.inner
        label = round_label(server_round, inner.num_rounds)
        reference = sorted_copy(params)
        inner.models.publish(server_round - 1, params)
        described = [{"site": i.site, "config": wire.to_json(i.config),
                      "extra": sorted(i.extra)} for i in instructions]
        if inner.store.round_row(server_round) is None:
            inner.store.open_round(server_round, described)
        else:
            logger.info("secagg %s: started before a restart and not committed; "
                        "running it again from training with fresh keys", label)
        # A fresh exchange id per attempt, so replies stored by an attempt that a
        # restart interrupted are never read again: that attempt's SecAggServer
        # is lost, and each site replaces its SecAggClient when it trains again.
        session = f"secagg-{server_round}-{secrets.token_hex(6)}"
        # Earlier rounds are committed, and an interrupted attempt of this one
        # must not leave shares from which its sum could still be computed.
        dropped = inner.store.delete_exchange_replies(SECURE_EXCHANGE_PREFIX)
        if dropped:
            logger.info("secagg %s: deleted %d stored protocol messages of earlier "
                        "rounds and attempts", label, dropped)
        outcome = SecureRound()
        metrics = self._train(server_round, session, instructions, outcome)
        sites = [i.site for i in instructions if i.site in metrics]
        need = inner.config.rounds.min_sites
        try:
            if len(sites) < need:
                raise PrivateSumAborted("train", f"{len(sites)} sites trained, fewer "
                                        f"than min_sites={need}")
            combiner = self.backend.combiner(server_round, sites, reference)
            private_sum = self._relay(combiner, server_round, session, label)
        except (PrivateSumAborted, ConfigError) as error:
            outcome.aborted = ("secure aggregation aborted, round skipped and the "
                               f"previous model kept: {error}")
            inner.store.close_round(server_round)
            return outcome
        outcome.private_sum = private_sum
        outcome.metrics = {site: metrics[site] for site in private_sum.sites}
        outcome.failures.update(private_sum.dropped)
        inner.store.close_round(server_round)
        return outcome

    def _train(self, server_round: int, session: str,
               instructions: Sequence[TrainInstruction],
               outcome: SecureRound) -> dict[str, dict[str, float]]:
        """Ask each site to train and keep its update; return the sites' metrics."""
        inner = self.inner
        requests = {}
        for instruction in instructions:
            if instruction.extra:
                raise NotSupportedError("secure aggregation in deployment sends no "
                                        "extra tensors to sites; the strategy asked "
                                        f"for {sorted(instruction.extra)}")
            requests[instruction.site] = wire.dumps({
                "round": server_round, "num_rounds": inner.num_rounds,
                "model_version": server_round - 1,
                "config": wire.to_json(instruction.config),
                "setup": inner.setup_blocks.get(instruction.site)})
        metrics: dict[str, dict[str, float]] = {}
        for item in inner.exchange(TRAIN_CHANNEL, f"{session}-train", server_round,
                                   requests, inner.config.rounds.deadline_seconds,
                                   validate=_check_train_reply):
            if isinstance(item, Failure):
                outcome.failures[item.site] = item.reason
                continue
            site, body = item
            reply = json.loads(body)
            if reply["status"] != "trained":
                outcome.failures[site] = f"site did not train: {reply['reason']}"
                continue
            metrics[site] = wire.metrics_from_json(reply["metrics"])
        return metrics

    def _relay(self, combiner: Combiner, server_round: int, session: str,
               label: str) -> PrivateSum:
        """Relay each protocol phase through one exchange; close it at its deadline."""
        limits = self.inner.config.limits
        max_reply = max(limits.max_exchange_bytes, limits.max_update_bytes)
        deadline = self.inner.config.rounds.phase_deadline_seconds
        requests = combiner.start()
        while requests:
            phase = str(next(iter(requests.values()))["phase"])
            bodies = {site: pack_message(message) for site, message in requests.items()}
            taken = 0
            for item in self.inner.exchange(PHASE_CHANNEL, f"{session}-{phase}",
                                            server_round, bodies, deadline,
                                            validate=_check_framing,
                                            max_reply_bytes=max_reply):
                if isinstance(item, Failure):
                    continue
                site, body = item
                taken += self._receive(combiner, label, phase, site,
                                       unpack_message(body))
            logger.info("secagg %s: phase %s closed with %d of %d replies", label,
                        phase, taken, len(bodies))
            requests = combiner.close_phase()
        return combiner.result()

    @staticmethod
    def _receive(combiner: Combiner, label: str, phase: str, site: str,
                 message: Message) -> int:
        if message.get("phase") == LEFT:
            logger.warning("secagg %s: phase %s: site %s leaves the round: %s",
                           label, phase, site, redact(str(message.get("reason"))))
            return 0
        try:
            combiner.receive(site, message)
        except MessageRejected as error:
            logger.warning("secagg %s: %s", label, redact(str(error)))
            return 0
        return 1


def sorted_copy(params: Mapping[str, np.ndarray]) -> ParameterSet:
    """Copy a parameter set with its tensors in name order.

    The masked vector lists tensors in the order of the reference, and the
    coordinator's model and a site's download (safetensors sorts names) may
    list them differently, so both sides sort.
    """
    return copy_params({name: params[name] for name in sorted(params)})


def _check_train_reply(site: str, body: bytes) -> None:
    try:
        reply = json.loads(body)
    except ValueError:
        reply = None
    valid = (isinstance(reply, dict) and reply.get("status") in ("trained", "failed")
             and isinstance(reply.get("metrics", {}), dict)
             and isinstance(reply.get("reason", ""), str))
    if not valid:
        raise RequestRejected(422, "invalid_reply",
                              f"site {site!r}: a secagg-train reply must be a JSON "
                              "object with status 'trained' and metrics, or 'failed' "
                              "and a reason")


def _check_framing(site: str, body: bytes) -> None:
    try:
        unpack_message(body)
    except ProtocolError as error:
        raise RequestRejected(422, "invalid_message",
                              f"site {site!r}: {error}") from None


class SiteSecureAggregation:
    """The site side: train without uploading, then reply to each protocol phase.

    The update lives only in this object's memory, so a site that restarts
    during a round leaves that round (the coordinator counts it as dropped).
    """

    def __init__(self, agent: SiteAgent) -> None:
        self.agent = agent
        self.encoders: dict[int, SecAggClient] = {}

    def train(self, request: bytes, task: dict[str, Any]) -> bytes:
        """Train on the round's model and keep the update for the protocol."""
        settings = json.loads(request)
        server_round = int(settings["round"])
        label = round_label(server_round, int(settings["num_rounds"]))
        site = self.agent.options.site
        self.encoders.clear()
        trainer = self.agent.trainer(settings["setup"])
        params = self.agent.model(int(settings["model_version"]))
        # The masks are computed phases after training, so the client keeps
        # its own copies of both parameter sets, in name order.
        reference = sorted_copy(params)
        instruction = TrainInstruction(site, server_round,
                                       dict(settings.get("config") or {}), {})
        try:
            reply = trainer.fit(params, instruction)
            self.encoders[server_round] = SecAggClient(
                site, server_round, reference, sorted_copy(reply.params),
                int(reply.num_samples))
        except UpdateRejected as error:
            return self._failed(label, f"update rejected at the site: {error.reason}")
        except (PriFedError, ValueError, RuntimeError) as error:
            return self._failed(label, f"{type(error).__name__}: {error}")
        self._save_stream()
        logger.info("fit %s: site %s trained on %d samples; the update stays here "
                    "for secure aggregation", label, site, reply.num_samples)
        return wire.dumps({"status": "trained", "metrics": wire.to_json(reply.metrics)})

    def phase(self, request: bytes, task: dict[str, Any]) -> bytes:
        """Reply to one secure-aggregation request with the site's SecAggClient."""
        message = unpack_message(request)
        server_round = message.get("round")
        encoder = self.encoders.get(server_round)  # type: ignore[arg-type]
        if encoder is None:
            return _leave(server_round, "this site holds no update for the round")
        try:
            reply = encoder.handle(message)
        except ProtocolError as error:
            logger.warning("secagg round %s: site %s leaves the round: %s",
                           server_round, self.agent.options.site, error)
            return _leave(server_round, str(error))
        if reply is None:
            return _leave(server_round, "the site sent nothing in this phase")
        return pack_message(reply)

    def _failed(self, label: str, reason: str) -> bytes:
        reason = redact(reason)
        logger.warning("fit %s: site %s did not train: %s", label,
                       self.agent.options.site, reason)
        return wire.dumps({"status": "failed", "reason": reason})

    def _save_stream(self) -> None:
        """Store the trainer's shuffled stream, as an accepted plain update does."""
        from prifed.deploy.agent import CLIENT_STATE_FILE, client_state, \
            save_client_state

        agent = self.agent
        base = agent._base_client or agent._trainer
        save_client_state(agent.folder / CLIENT_STATE_FILE,
                          client_state(base, agent._setup_digest or ""))


def _leave(server_round: Any, reason: str) -> bytes:
    return pack_message({"phase": LEFT, "round": server_round, "reason": reason})


def install_site_handlers(agent: SiteAgent) -> None:
    """Add the secure-aggregation exchange channels to a site agent."""
    site = SiteSecureAggregation(agent)
    agent.handlers.setdefault(TRAIN_CHANNEL, site.train)
    agent.handlers.setdefault(PHASE_CHANNEL, site.phase)


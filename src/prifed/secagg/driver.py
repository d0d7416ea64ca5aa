"""Run secure aggregation in one process: the backend and a one-round driver.

:func:`run_secagg_round` plays one coordinator and N sites, sends every
message through the byte framing of :mod:`prifed.core.secure_sum` as a
network would, and can make sites drop out before any phase. Tests and
benchmarks use it; :class:`SecAggBackend` is what the round engine uses.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from prifed.core.aggregate import WeightedMean
from prifed.core.params import ParameterSet, num_values
from prifed.core.secure_sum import (
    Combiner,
    Message,
    MessageRejected,
    PrivateSum,
    SiteEncoder,
    pack_message,
    unpack_message,
)
from prifed.errors import ConfigError, ProtocolError
from prifed.log import get_logger
from prifed.secagg.client import SecAggClient
from prifed.secagg.config import SecAggConfig
from prifed.secagg.messages import PHASES
from prifed.secagg.server import SecAggServer

logger = get_logger(__name__)

Recorder = list[tuple[str, str, bytes]]
"""Every framed message of a round: ("to" or "from", site, bytes)."""

Intercept = Callable[[str, Message], Message | None]
"""Changes or swallows a site's reply before the coordinator receives it."""


class SecAggBackend:
    """The private-sum backend of pairwise-masking secure aggregation."""

    def __init__(self, config: SecAggConfig | None = None) -> None:
        self.config = config or SecAggConfig()
        self.name = self.config.mode

    def check(self, num_sites: int, reference: Mapping[str, object]) -> None:
        """Raise ConfigError at start-up when a round of ``num_sites`` cannot run."""
        self.config.plan(num_sites, num_values(reference))  # type: ignore[arg-type]

    def site_encoder(self, site: str, server_round: int, reference: ParameterSet,
                     update: ParameterSet, num_samples: int) -> SecAggClient:
        """Return the site side of one round for this site's update."""
        return SecAggClient(site, server_round, reference, update, num_samples)

    def combiner(self, server_round: int, sites: Sequence[str],
                 reference: ParameterSet) -> SecAggServer:
        """Return the coordinator side of one round among ``sites``."""
        return SecAggServer(server_round, sites, reference, self.config)


@dataclass
class RoundStats:
    """Cost of one simulated round, per site and for the coordinator."""

    site_seconds: dict[str, float] = field(default_factory=dict)
    coordinator_seconds: float = 0.0
    bytes_sent: dict[str, int] = field(default_factory=dict)
    bytes_received: dict[str, int] = field(default_factory=dict)


@dataclass
class SecAggRound:
    """The outcome of one simulated round."""

    mean: ParameterSet | None
    private_sum: PrivateSum
    stats: RoundStats
    rejected: list[MessageRejected]


def run_secagg_round(updates: Mapping[str, ParameterSet],
                     num_samples: Mapping[str, int], reference: ParameterSet,
                     config: SecAggConfig | None = None, server_round: int = 1,
                     dropouts: Mapping[str, Collection[str]] | None = None,
                     recorder: Recorder | None = None,
                     intercept: Intercept | None = None) -> SecAggRound:
    """Run one round among the sites of ``updates``; return the weighted mean.

    ``dropouts`` maps a phase name to the sites that stop replying from that
    phase on. ``mean`` is None when the total weight is zero. Raises
    PrivateSumAborted when too few sites remain, with no model produced.
    """
    sites = list(updates)
    backend = SecAggBackend(config)
    server = backend.combiner(server_round, sites, reference)
    clients = {site: backend.site_encoder(site, server_round, reference,
                                          updates[site], num_samples[site])
               for site in sites}
    stats = RoundStats(bytes_sent=dict.fromkeys(sites, 0),
                       bytes_received=dict.fromkeys(sites, 0))
    private_sum = exchange(server, clients, dropouts, recorder, intercept, stats)
    stats.coordinator_seconds = server.seconds
    stats.site_seconds = {site: client.seconds for site, client in clients.items()}
    return SecAggRound(_mean(private_sum, reference), private_sum, stats,
                       list(server.rejected))


def exchange(combiner: Combiner, encoders: Mapping[str, SiteEncoder],
             dropouts: Mapping[str, Collection[str]] | None = None,
             recorder: Recorder | None = None, intercept: Intercept | None = None,
             stats: RoundStats | None = None) -> PrivateSum:
    """Relay one round's messages between a combiner and its sites.

    Every message is framed to bytes and parsed back, as over a network. A
    site whose encoder raises ProtocolError leaves the round; a reply the
    combiner rejects is left out. Raises PrivateSumAborted from the combiner.
    """
    unknown = sorted(set(dropouts or {}) - set(PHASES))
    if unknown:
        raise ConfigError(f"dropout phases must be among {', '.join(PHASES)}; got "
                          f"{unknown[0]!r}")
    stopped: set[str] = set()
    requests = combiner.start()
    while requests:
        phase = next(iter(requests.values()))["phase"]
        stopped |= set((dropouts or {}).get(phase, ()))
        for site, request in requests.items():
            if site in stopped:
                continue
            reply = _relay(site, request, encoders[site], stats, recorder)
            if reply is None:
                stopped.add(site)
                continue
            if intercept is not None:
                reply = intercept(site, reply)
                if reply is None:
                    continue
            try:
                combiner.receive(site, reply)
            except MessageRejected:
                continue
        requests = combiner.close_phase()
    return combiner.result()


def _relay(site: str, request: Message, encoder: SiteEncoder,
           stats: RoundStats | None, recorder: Recorder | None) -> Message | None:
    framed = pack_message(request)
    if stats is not None:
        stats.bytes_received[site] = stats.bytes_received.get(site, 0) + len(framed)
    if recorder is not None:
        recorder.append(("to", site, framed))
    try:
        reply = encoder.handle(unpack_message(framed))
    except ProtocolError as error:
        logger.warning("secagg round %s: site %s leaves the round: %s",
                       request.get("round"), site, error)
        return None
    if reply is None:
        return None
    framed = pack_message(reply)
    if stats is not None:
        stats.bytes_sent[site] = stats.bytes_sent.get(site, 0) + len(framed)
    if recorder is not None:
        recorder.append(("from", site, framed))
    return unpack_message(framed)


def _mean(private_sum: PrivateSum, reference: ParameterSet) -> ParameterSet | None:
    if private_sum.total_weight <= 0:
        return None
    mean = WeightedMean(reference)
    mean.add_sum(private_sum.weighted_sum, private_sum.total_weight,
                 len(private_sum.sites))
    return mean.result()

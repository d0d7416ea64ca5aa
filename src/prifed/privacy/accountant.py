"""Privacy accounting with Google's dp-accounting: RDP and PLD accountants.

Every release PriFed accounts for is a :class:`GaussianEvent`: ``steps``
compositions of a Gaussian mechanism with noise multiplier ``sigma`` (noise
standard deviation over sensitivity), each applied to a Poisson sample that
takes each record with probability ``sample_rate``. DP-SGD on a site is one
event per round with the site's sampling rate; a DP-FedAvg round is one step
at rate 1, since a site takes part in a round whole.

Adjacency is adding or removing one record (record level) or one site's update
(site level), as in Opacus and dp-accounting. A noise multiplier of 0 releases
the clipped value exactly, so its epsilon is infinite.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import dp_accounting
from dp_accounting import pld, rdp

from prifed.errors import ConfigError

ACCOUNTANTS = ("rdp", "pld")

RDP_ORDERS = tuple([x / 10 for x in range(20, 110)] + list(range(11, 64))
                   + [128, 256, 512, 1024])
"""Renyi orders of the RDP accountant: dp-accounting's defaults from 2 up.

dp-accounting often fails to evaluate the subsampled Gaussian at fractional
orders below 2 (it logs a warning and skips them). Those orders are the best
ones only for epsilons above about log(1/delta), which stay valid but can be
slightly looser without them.
"""

PLD_DISCRETIZATION = 1e-4
"""Value discretisation of the PLD accountant; dp-accounting's default."""


@dataclass(frozen=True)
class GaussianEvent:
    """``steps`` Poisson-subsampled Gaussian mechanisms with one noise multiplier."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0:
            raise ConfigError("noise_multiplier must be at least 0; got "
                              f"{self.noise_multiplier}")
        if not 0 <= self.sample_rate <= 1:
            raise ConfigError("sample_rate must be between 0 and 1; got "
                              f"{self.sample_rate}")
        if self.steps < 0:
            raise ConfigError(f"steps must be at least 0; got {self.steps}")

    @property
    def releases_data(self) -> bool:
        """Tell whether the event touches any record at all."""
        return self.steps > 0 and self.sample_rate > 0


def sampling_rate(expected_batch_size: float, num_records: int) -> float:
    """Return the Poisson sampling rate: expected batch size over records.

    The accountant uses this rate whatever sampler drew the batches.
    """
    if num_records < 1:
        raise ConfigError(f"num_records must be at least 1; got {num_records}")
    if expected_batch_size <= 0:
        raise ConfigError("expected batch size must be positive; got "
                          f"{expected_batch_size}")
    if expected_batch_size > num_records:
        raise ConfigError(f"expected batch size must be at most the {num_records} "
                          f"records of the site; got {expected_batch_size}")
    return float(expected_batch_size) / float(num_records)


def merge_events(events: Iterable[GaussianEvent]) -> list[GaussianEvent]:
    """Sum the steps of events that share noise multiplier and sampling rate.

    Composition does not depend on order, and one self-composed event costs
    the accountant as much as a single step.
    """
    steps: dict[tuple[float, float], int] = defaultdict(int)
    for event in events:
        if event.releases_data:
            steps[(event.noise_multiplier, event.sample_rate)] += event.steps
    return [GaussianEvent(sigma, rate, count)
            for (sigma, rate), count in sorted(steps.items())]


def to_dp_event(events: Iterable[GaussianEvent]) -> dp_accounting.DpEvent:
    """Express events as one dp-accounting event (a composition)."""
    parts: list[dp_accounting.DpEvent] = []
    for event in merge_events(events):
        step: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(
            event.noise_multiplier)
        if event.sample_rate < 1:
            step = dp_accounting.PoissonSampledDpEvent(event.sample_rate, step)
        parts.append(dp_accounting.SelfComposedDpEvent(step, event.steps))
    return dp_accounting.ComposedDpEvent(parts)


def new_accountant(name: str) -> dp_accounting.PrivacyAccountant:
    """Return a fresh dp-accounting accountant: ``rdp`` or ``pld``."""
    if name == "rdp":
        return rdp.RdpAccountant(list(RDP_ORDERS))
    if name == "pld":
        return pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    raise ConfigError(f"accountant must be one of {', '.join(ACCOUNTANTS)}; "
                      f"got {name!r}")


def compute_epsilon(events: Iterable[GaussianEvent], delta: float,
                    accountant: str = "rdp") -> float:
    """Return the epsilon of the composed events at ``delta``; inf without noise."""
    check_delta(delta)
    merged = merge_events(events)
    if not merged:
        return 0.0
    if any(event.noise_multiplier == 0 for event in merged):
        return math.inf
    return _epsilon(tuple(merged), delta, accountant)


@lru_cache(maxsize=256)
def _epsilon(merged: tuple[GaussianEvent, ...], delta: float, accountant: str
             ) -> float:
    # A ledger checks a round and then records it: the same composition twice.
    engine = new_accountant(accountant)
    engine.compose(to_dp_event(merged))
    return float(engine.get_epsilon(delta))


def calibrate_noise_multiplier(target_epsilon: float, delta: float,
                               sample_rate: float, steps: int,
                               accountant: str = "rdp") -> float:
    """Return the smallest noise multiplier whose epsilon stays within the target.

    dp-accounting's bisection returns a value whose epsilon is at most
    ``target_epsilon`` for ``steps`` steps at ``sample_rate``.
    """
    check_delta(delta)
    if not target_epsilon > 0 or math.isinf(target_epsilon):
        raise ConfigError("target epsilon must be positive and finite; got "
                          f"{target_epsilon}")
    if steps < 1:
        raise ConfigError(f"steps must be at least 1; got {steps}")

    def make_event(sigma: float) -> dp_accounting.DpEvent:
        return to_dp_event([GaussianEvent(sigma, sample_rate, steps)])

    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: new_accountant(accountant), make_event, target_epsilon, delta))


def check_delta(delta: float) -> None:
    """Raise ConfigError unless delta lies strictly between 0 and 1."""
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be between 0 and 1; got {delta}")

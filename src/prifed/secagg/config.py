"""Settings of secure aggregation and the per-round plan derived from them.

The full-graph protocol (Bonawitz et al., CCS 2017) shares every site's
secrets with every other site. SecAgg+ (Bell et al., CCS 2020) shares them
only with the site's neighbours in a random regular graph whose degree grows
with log n. Both run the same code: the full graph is the complete graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from prifed.errors import ConfigError
from prifed.secagg.encoding import FixedPoint

MODES = ("secagg", "secagg+")
MIN_SITES = 3
"""A sum over two sites reveals to each of them the other's update."""


@dataclass(frozen=True)
class SecAggConfig:
    """User settings of secure aggregation, fixed for a whole run.

    ``threshold`` is the number of share holders needed to rebuild a site's
    secrets: an int, or a fraction of the holders (the site and its
    neighbours) so that ``floor(fraction * holders) + 1`` are needed.
    ``neighbours`` is the SecAgg+ graph degree (even); None picks the smallest
    even number at least 4 * log2(n). The full graph ignores it.
    """

    mode: str = "secagg+"
    threshold: int | float = 0.5
    neighbours: int | None = None
    encoding: FixedPoint = field(default_factory=FixedPoint)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"secure aggregation mode must be one of "
                              f"{', '.join(MODES)}; got {self.mode!r}")
        if isinstance(self.threshold, bool):
            raise ConfigError(f"threshold must be an int or a fraction; got "
                              f"{self.threshold!r}")
        if isinstance(self.threshold, float) and not 0 < self.threshold < 1:
            raise ConfigError("threshold as a fraction must be between 0 and 1; "
                              f"got {self.threshold}")
        if isinstance(self.threshold, int) and self.threshold < 2:
            raise ConfigError(f"threshold must be at least 2; got {self.threshold}")
        if self.neighbours is not None and (self.neighbours < 2
                                            or self.neighbours % 2):
            raise ConfigError("neighbours must be an even number of at least 2; "
                              f"got {self.neighbours}")

    def plan(self, num_sites: int, num_values: int) -> RoundPlan:
        """Fix degree, threshold and modulus for a round among ``num_sites``.

        Raises ConfigError when the round cannot run: too few sites, a
        threshold above the number of holders, or a sum that could wrap.
        """
        if num_sites < MIN_SITES:
            raise ConfigError(f"secure aggregation needs at least {MIN_SITES} "
                              f"sites; got {num_sites}")
        degree = self.degree(num_sites)
        holders = degree + 1
        if isinstance(self.threshold, float):
            threshold = max(2, math.floor(self.threshold * holders) + 1)
        else:
            threshold = self.threshold
        if threshold > holders:
            raise ConfigError(f"threshold must be at most {holders}, the number of "
                              f"share holders per site; got {threshold}")
        bits = self.encoding.modulus_bits(num_sites, num_values)
        return RoundPlan(num_sites, degree, threshold, bits)

    def degree(self, num_sites: int) -> int:
        """Return how many neighbours each site masks with."""
        if self.mode == "secagg":
            return num_sites - 1
        if self.neighbours is not None:
            requested = self.neighbours
        else:
            requested = 2 * math.ceil(2 * math.log2(num_sites))
        return min(num_sites - 1, requested)


@dataclass(frozen=True)
class RoundPlan:
    """Public parameters of one round, sent to every site at its start."""

    num_sites: int
    degree: int
    threshold: int
    bits: int


def neighbourhoods(sites: Sequence[str], degree: int,
                   seed: bytes) -> dict[str, list[str]]:
    """Return each site's neighbours in a random ``degree``-regular graph.

    The graph is a Harary graph on a random ordering of the sites: each site
    is joined to the ``degree / 2`` sites on either side of it on a ring.
    ``degree >= len(sites) - 1`` gives the complete graph.
    """
    count = len(sites)
    if degree >= count - 1:
        return {site: [other for other in sites if other != site] for site in sites}
    rng = np.random.default_rng(int.from_bytes(seed, "big"))
    ring = [sites[i] for i in rng.permutation(count)]
    order = {site: i for i, site in enumerate(sites)}
    steps = range(1, degree // 2 + 1)
    result: dict[str, list[str]] = {}
    for position, site in enumerate(ring):
        near = [ring[(position + s) % count] for s in steps]
        near += [ring[(position - s) % count] for s in steps]
        result[site] = sorted(set(near), key=order.__getitem__)
    return result

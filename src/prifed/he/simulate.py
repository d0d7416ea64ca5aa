"""Wire homomorphic aggregation into an in-process run of the round engine.

:func:`homomorphic_federation` turns a plain strategy and plain site clients
into their CKKS counterparts. It creates a fresh federation key in memory,
gives each site its own copy of the site context and the coordinator a
context without the secret key, as a deployment does with files. After
``RoundEngine.run`` the final model is read at a site with
:func:`final_model`, because the coordinator holds only ciphertexts.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from prifed.core.params import ParameterSet
from prifed.core.strategy import Strategy
from prifed.errors import ConfigError, ProtocolError
from prifed.he.client import HESiteClient, PlainSiteClient
from prifed.he.keys import (FederationKey, coordinator_key, create_federation_key,
                            load_key, site_context_bytes)
from prifed.he.params import DEFAULT_PRECISION, DEFAULT_VALUE_RANGE, select_params
from prifed.he.site import HESite
from prifed.he.strategy import HomomorphicStrategy, site_optimizer
from prifed.log import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class HomomorphicSettings:
    """The federation bounds that fix the CKKS parameters of a run.

    ``max_weight`` defaults to the largest number of training rows of any
    site, which is each site's weight in FedAvg.
    """

    value_range: float = DEFAULT_VALUE_RANGE
    precision: float = DEFAULT_PRECISION
    max_weight: float | None = None


def homomorphic_federation(plain: Strategy, strategy_options: Mapping[str, Any],
                           clients: Sequence[PlainSiteClient],
                           initial: Mapping[str, np.ndarray],
                           trainable: Collection[str],
                           settings: HomomorphicSettings | None = None,
                           key: FederationKey | None = None,
                           ) -> tuple[HomomorphicStrategy, list[HESiteClient]]:
    """Return the CKKS strategy and wrapped clients for a run of ``plain``.

    ``key`` is a site context to use instead of a fresh one; its parameters
    must allow sums of ``len(clients)`` sites.
    """
    settings = settings or HomomorphicSettings()
    if key is None:
        key = create_federation_key(select_params(
            len(clients), settings.value_range, settings.precision,
            _max_weight(clients, settings)), run="simulation")
    elif key.params.num_sites < len(clients):
        raise ConfigError(f"key {key.key_id} allows sums of {key.params.num_sites} "
                          f"sites; the run has {len(clients)}")
    site_bytes = site_context_bytes(key)
    wrapped = []
    for client in clients:
        site = HESite(client.name, load_key(site_bytes, source=client.name),
                      site_optimizer(plain.name, strategy_options), trainable)
        site.start(initial)
        wrapped.append(HESiteClient(client, site))
    params = key.params
    logger.info("setup: CKKS degree %d, primes %s, scale 2^%d for %d sites, value "
                "range ±%g, max weight %g", params.poly_modulus_degree,
                list(params.coeff_mod_bit_sizes), params.scale_bits,
                len(clients), params.value_range, params.max_weight)
    return HomomorphicStrategy(plain, coordinator_key(key)), wrapped


def _max_weight(clients: Sequence[PlainSiteClient],
                settings: HomomorphicSettings) -> float:
    if settings.max_weight is not None:
        return settings.max_weight
    rows = [getattr(client, "num_train", None) for client in clients]
    counts = [r for r in rows if isinstance(r, int)]
    if len(counts) != len(rows):
        raise ConfigError("max_weight is needed for homomorphic aggregation when "
                          "site clients do not report num_train")
    return float(max(counts))


def final_model(clients: Sequence[HESiteClient]) -> ParameterSet:
    """Return the global model after the run, checking that every site agrees."""
    digests = {client.name: client.site.digest for client in clients}
    if len(set(digests.values())) != 1:
        raise ProtocolError(f"sites hold different global models after the run: "
                          f"{digests}")
    return dict(clients[0].model)

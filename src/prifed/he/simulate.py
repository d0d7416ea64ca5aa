"""Wire homomorphic aggregation into an in-process run of the round engine.

:func:`homomorphic_federation` turns a plain strategy and plain site clients
into their CKKS counterparts. It creates a fresh federation key in memory,
gives each site its own copy of the site context and the coordinator a
context without the secret key, as a deployment does with files. After
``RoundEngine.run`` the final model is read at a site with
:func:`final_model`, because the coordinator has only ciphertexts.
:func:`run_homomorphic_spec` runs one strategy of ``prifed simulate`` this way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from prifed.core.engine import RoundEngine, RoundRecord
from prifed.core.params import ParameterSet
from prifed.core.strategy import Strategy
from prifed.errors import ConfigError, NotSupportedError, ProtocolError
from prifed.he.client import HESiteClient, PlainSiteClient
from prifed.he.keys import (FederationKey, coordinator_key, create_federation_key,
                            load_key, site_context_bytes)
from prifed.he.params import HomomorphicSettings, select_params
from prifed.he.site import HESite
from prifed.he.strategy import HomomorphicStrategy, site_optimizer
from prifed.log import get_logger

logger = get_logger(__name__)


def homomorphic_federation(plain: Strategy, strategy_options: Mapping[str, Any],
                           clients: Sequence[PlainSiteClient],
                           initial: Mapping[str, np.ndarray],
                           trainable: Collection[str],
                           settings: HomomorphicSettings | None = None,
                           key: FederationKey | None = None,
                           evaluate_every: int = 1,
                           ) -> tuple[HomomorphicStrategy, list[HESiteClient]]:
    """Return the CKKS strategy and wrapped clients for a run of ``plain``.

    ``key`` is a site context to use instead of a fresh one; its parameters
    must allow sums of ``len(clients)`` sites. ``evaluate_every`` is the
    engine's setting, checked because every site must receive every aggregate.
    """
    settings = settings or HomomorphicSettings()
    sampled = plain.sites_per_round is not None and plain.sites_per_round < len(clients)
    if sampled and evaluate_every != 1:
        raise ConfigError(
            f"with homomorphic aggregation every site must receive every aggregate, "
            f"so sampling {plain.sites_per_round} of {len(clients)} sites needs "
            f"evaluation in every round (evaluate_every 1; got {evaluate_every}): "
            "the evaluation carries the aggregate to the sites left out")
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


def run_homomorphic_spec(spec: Any, sites: Sequence[Any],
                         model_factory: Callable[[], Any], settings: Any,
                         options: HomomorphicSettings,
                         progress: Callable[[int, Any], None] | None = None) -> Any:
    """Run one strategy of a simulation with CKKS; return a ``FederatedRun``.

    ``spec``, ``sites`` and ``settings`` are the simulation's
    :class:`~prifed.strategies.StrategySpec`, prepared sites and
    :class:`~prifed.federated.RunSettings`. Rounds run in wall-clock time,
    because a site that a simulated availability window keeps offline would
    miss an aggregate.
    """
    from prifed.federated import FederatedRun, build_clients, build_spec_strategy, \
        spec_options
    from prifed.training.models import get_params, trainable_names
    from prifed.transport.inprocess import InProcessTransport

    if settings.profiles:
        raise NotSupportedError("simulated site speeds and availability do not "
                                "apply to homomorphic runs; leave them unset")
    chosen = spec_options(spec, settings)
    plain = build_spec_strategy(spec, settings, chosen)
    clients = build_clients(sites, model_factory, settings)
    initial = model_factory()
    params, trainable = get_params(initial), trainable_names(initial)
    evaluate_every = int(getattr(settings, "evaluate_every", 1))
    strategy, wrapped = homomorphic_federation(plain, chosen, clients, params,
                                               trainable, options,
                                               evaluate_every=evaluate_every)
    curve: list[Any] = []

    def on_round(record: RoundRecord) -> None:
        if not record.eval_metrics:
            return
        curve.append(record.eval_metrics)
        if progress is not None:
            progress(record.server_round, record.eval_metrics)

    engine = RoundEngine(strategy, InProcessTransport(wrapped), settings.rounds,
                         seed=settings.seed, evaluate_every=evaluate_every,
                         on_round=on_round)
    started = time.perf_counter()
    engine.run(params, trainable)
    seconds = time.perf_counter() - started
    compute = sum(m.get("train_seconds", 0.0) for r in engine.history
                  for m in r.train_metrics.values())
    compute += sum(m.get("eval_seconds", 0.0) for r in engine.history
                   for m in r.eval_metrics.values())
    return FederatedRun(spec.label, curve, [], final_model(wrapped), engine.history,
                        seconds, compute, asynchronous=False)


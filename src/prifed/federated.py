"""Run one federated strategy on prepared sites, in simulated time.

Synchronous strategies go through the round engine over a
:class:`~prifed.simclock.TimedTransport`; FedBuff runs asynchronously through
:func:`~prifed.simclock.run_async` with the same budget of site tasks
(rounds times sites). Every strategy of a comparison gets fresh site clients
built with the same seeds, so all see the same splits, initial model and
shuffled streams.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from prifed.baselines import Curve
from prifed.core.engine import RoundEngine, RoundRecord
from prifed.core.messages import EvaluateReply
from prifed.core.params import ParameterSet
from prifed.log import get_logger
from prifed.simclock import AsyncRecord, SiteProfile, SiteTimeline, TimedTransport, \
    run_async
from prifed.sitedata import PreparedSite
from prifed.strategies import STRATEGIES, StrategySpec, build_strategy, \
    strategy_options
from prifed.strategies.fedbuff import FedBuff
from prifed.training.client import SiteClient
from prifed.training.models import get_params, trainable_names
from prifed.training.personal import Personalization
from prifed.transport.inprocess import InProcessTransport

logger = get_logger(__name__)

RoundProgress = Callable[[int, Mapping[str, Mapping[str, float]]], None]
"""Called with an equivalent round number and the per-site metrics after it."""


@dataclass
class RunSettings:
    """Settings every strategy of a comparison shares: training, sites, time."""

    rounds: int
    local_config: dict[str, Any]
    seed: int
    sites_per_round: int | None = None
    shared_options: dict[str, Any] = field(default_factory=dict)
    personalization: Personalization = field(default_factory=Personalization)
    profiles: dict[str, SiteProfile] = field(default_factory=dict)
    step_seconds: float = 0.01
    evaluate_every: int = 1
    """Synchronous runs score the global model every this many rounds and
    after the last; asynchronous runs score it after every server update."""
    secure_aggregation: str = "off"
    """off, secagg or secagg+: sites send a masked sum, never their updates."""


@dataclass
class FederatedRun:
    """Test metrics of one strategy after each server update, with times."""

    label: str
    curve: Curve
    times: list[float]
    model: ParameterSet
    history: list[RoundRecord] | list[AsyncRecord]
    seconds: float
    compute_seconds: float
    asynchronous: bool


def spec_options(spec: StrategySpec, settings: RunSettings) -> dict[str, Any]:
    """Merge the run's shared strategy options that apply with the spec's own."""
    options = {k: v for k, v in settings.shared_options.items()
               if k in strategy_options(STRATEGIES[spec.name])}
    options.update(spec.options)
    return options


def build_spec_strategy(spec: StrategySpec, settings: RunSettings,
                        options: Mapping[str, Any] | None = None) -> Any:
    """Build the strategy a spec names, with the run's sampling and local settings."""
    chosen = spec_options(spec, settings) if options is None else dict(options)
    return build_strategy(spec.name, sites_per_round=settings.sites_per_round,
                          local_config=settings.local_config, **chosen)


def build_clients(sites: Sequence[PreparedSite],
                  model_factory: Callable[[], nn.Module],
                  settings: RunSettings) -> list[SiteClient]:
    """Build one plain site client per site, seeded by its position."""
    return [SiteClient(s.name, model_factory, s.train_x, s.train_y, s.test_x,
                       s.test_y, settings.seed + i, settings.personalization)
            for i, s in enumerate(sites)]


def run_federated(spec: StrategySpec, sites: Sequence[PreparedSite],
                  model_factory: Callable[[], nn.Module], settings: RunSettings,
                  progress: RoundProgress | None = None) -> FederatedRun:
    """Train one strategy on the sites and return its curve in simulated time."""
    strategy = build_spec_strategy(spec, settings)
    clients = build_clients(sites, model_factory, settings)
    steps = int(settings.local_config.get("local_steps", 100))
    timeline = SiteTimeline([s.name for s in sites], settings.profiles,
                            settings.step_seconds, steps * settings.step_seconds,
                            settings.seed)
    initial = model_factory()
    params, trainable = get_params(initial), trainable_names(initial)
    started = time.perf_counter()
    if isinstance(strategy, FedBuff):
        run = _run_async(spec, strategy, clients, timeline, params, trainable,
                         settings.rounds, progress)
    else:
        run = _run_sync(spec, strategy, clients, timeline, params, trainable,
                        settings, progress)
    run.seconds = time.perf_counter() - started
    logger.info("method %s: %d server updates in %.1f s, %.1f simulated s",
                spec.label, len(run.curve), run.seconds,
                run.times[-1] if run.times else 0.0)
    return run


def _run_sync(spec: StrategySpec, strategy: Any, clients: list[SiteClient],
              timeline: SiteTimeline, params: ParameterSet, trainable: list[str],
              settings: RunSettings, progress: RoundProgress | None) -> FederatedRun:
    timed = TimedTransport(InProcessTransport(clients), timeline)
    transport: Any = timed
    if settings.secure_aggregation != "off":
        from prifed.secagg.transport import secure_transport

        transport = secure_transport(settings.secure_aggregation, strategy, timed,
                                     params, settings.sites_per_round)
    curve: Curve = []
    times: list[float] = []

    def on_round(record: RoundRecord) -> None:
        if record.eval_metrics:
            curve.append(record.eval_metrics)
            times.append(timed.clock.now)
        if progress is not None:
            progress(record.server_round, record.eval_metrics)

    engine = RoundEngine(strategy, transport, settings.rounds, seed=settings.seed,
                         evaluate_every=settings.evaluate_every, on_round=on_round)
    final = engine.run(params, trainable)
    compute = sum(m.get("train_seconds", 0.0) for r in engine.history
                  for m in r.train_metrics.values())
    compute += sum(m.get("eval_seconds", 0.0) for r in engine.history
                   for m in r.eval_metrics.values())
    return FederatedRun(spec.label, curve, times, final, engine.history, 0.0,
                        compute, asynchronous=False)


def _run_async(spec: StrategySpec, strategy: FedBuff, clients: list[SiteClient],
               timeline: SiteTimeline, params: ParameterSet, trainable: list[str],
               rounds: int, progress: RoundProgress | None) -> FederatedRun:
    transport = InProcessTransport(clients)
    curve: Curve = []
    times: list[float] = []
    reported = 0

    def on_update(record: AsyncRecord) -> None:
        nonlocal reported
        curve.append(record.eval_metrics)
        times.append(record.time)
        # One equivalent round is one task per site, the synchronous budget.
        while progress is not None and reported < record.tasks_done // len(clients):
            reported += 1
            progress(reported, record.eval_metrics)

    final, history = run_async(strategy, transport, timeline, params, trainable,
                               rounds * len(clients), on_update)
    if not curve:
        # Fewer tasks than one buffer: report the initial model.
        curve.append({r.site: dict(r.metrics) for r in transport.evaluate(
            0, final, transport.site_ids()) if isinstance(r, EvaluateReply)})
        times.append(0.0)
    compute = history[-1].train_seconds if history else 0.0
    compute += sum(sum(m.get("eval_seconds", 0.0) for m in r.eval_metrics.values())
                   for r in history)
    return FederatedRun(spec.label, curve, times, final, history, 0.0, compute,
                        asynchronous=True)


def personal_curve(curve: Curve) -> Curve | None:
    """Return the personalised metrics of a curve, or None if it has none."""
    if not curve or not any("personal_accuracy" in m for m in curve[-1].values()):
        return None
    return [{site: {k[len("personal_"):]: v for k, v in m.items()
                    if k.startswith("personal_")}
             for site, m in per_site.items()} for per_site in curve]

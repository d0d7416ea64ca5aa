"""DP in a simulated federation: options, site folders, and the privacy summary.

A simulation plays every site, so it also writes each site's policy file
when the site has none (with the run's limit) before any round starts. In a
deployment each site writes its own policy and keeps its folder; nothing here
runs at the coordinator except :func:`private_strategy` and
:func:`privacy_summary`, which reads only what sites report.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from prifed.core.engine import RoundEngine, RoundRecord
from prifed.core.params import ParameterSet
from prifed.core.strategy import Strategy
from prifed.errors import ConfigError, NotSupportedError
from prifed.log import get_logger, round_label
from prifed.privacy.client import TRAINING_KEYS, PrivateSiteClient
from prifed.privacy.errors import BudgetExhausted
from prifed.privacy.ledger import format_epsilon
from prifed.privacy.policy import SitePolicy, policy_path, write_policy
from prifed.privacy.settings import DPSettings
from prifed.privacy.sitelevel import secagg_value_bound
from prifed.privacy.strategy import PrivateStrategy
from prifed.privacy.validation import validate_for_dp
from prifed.sitedata import PreparedSite
from prifed.training.models import get_params, trainable_names
from prifed.transport.inprocess import InProcessTransport

logger = get_logger(__name__)

DP_MODES = ("off", "record", "site")

DEFAULT_CLIP = {"record": 1.0, "site": 0.1}
"""Default L2 clip norms: a record's gradient, and a site's whole update.

1.0 clips most per-record gradients of a logistic regression on standardised
features. 0.1 is about the median update norm of the heart job's non-private
rounds (100 SGD steps at learning rate 0.01); other jobs need their own.
"""

TRUST = {
    "off": "no differential privacy",
    "record": "record-level DP-SGD on each site; each site adds its own noise, "
              "so no other party needs to be trusted for it",
    "coordinator": "site-level DP with the noise added by the coordinator, which "
                   "sees every clipped update: sites must trust it to add the "
                   "noise and discard the clean sum (weaker trust assumption)",
    "sites": "site-level DP with every site adding a share of the noise before "
             "secure aggregation masks its update: no party sees the sum "
             "without noise, as long as at least min_sites sites add shares",
}


@dataclass
class PrivacyOptions:
    """DP settings of a simulation, as ``prifed simulate`` takes them.

    ``clip_norm`` defaults to :data:`DEFAULT_CLIP` of the mode.
    ``site_root`` is the folder that contains one privacy folder per site.
    ``epsilon_limit`` goes into the policy files the simulation writes for
    sites that have none; it defaults to ``epsilon`` (no limit when only a
    noise multiplier is given). ``run_id`` labels the run in the ledgers.
    """

    mode: str = "off"
    epsilon: float | None = None
    delta: float = 1e-5
    noise_multiplier: float | None = None
    clip_norm: float | None = None
    accountant: str = "rdp"
    epsilon_limit: float | None = None
    site_root: str | None = None
    min_sites: int | None = None
    run_id: str = ""

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def clip(self) -> float:
        """Return the clip norm, or the mode's default when none was set."""
        if self.clip_norm is not None:
            return self.clip_norm
        return DEFAULT_CLIP.get(self.mode, 1.0)

    def validate(self, strategies: int = 1, personalised: bool = False) -> None:
        """Check the options before any work starts.

        A DP simulation runs one strategy, because every run spends the
        sites' budgets, and no personalisation, whose local layers and
        fine-tuning would train without DP.
        """
        if self.mode not in DP_MODES:
            raise ConfigError(f"dp must be one of {', '.join(DP_MODES)}; "
                              f"got {self.mode!r}")
        if not self.enabled:
            return
        if strategies != 1:
            raise NotSupportedError(
                f"DP runs one strategy at a time, because each run spends the "
                f"sites' privacy budgets; got {strategies}")
        if personalised:
            raise NotSupportedError("personal layers and fine-tuning would train "
                                    "without DP; turn them off to use DP")
        if self.site_root is None:
            raise ConfigError("DP needs a folder for the sites' policies and "
                              "ledgers (site_root)")
        if self.epsilon_limit is not None and not self.epsilon_limit > 0:
            raise ConfigError("epsilon limit must be positive; got "
                              f"{self.epsilon_limit}")
        self.settings(1)

    def settings(self, rounds: int, secure_aggregation: bool = False,
                 num_sites: int | None = None) -> DPSettings:
        """Return the DP settings the coordinator proposes for a run."""
        placement = "sites" if secure_aggregation and self.mode == "site" \
            else "coordinator"
        min_sites = self.min_sites or (num_sites if placement == "sites" else None)
        return DPSettings(self.mode, self.delta, self.epsilon, self.noise_multiplier,
                          self.clip, rounds, self.accountant, placement,
                          min_sites, self.run_id)

    def site_policy(self) -> SitePolicy:
        """Return the policy a simulated site gets when it has none."""
        limit = self.epsilon_limit if self.epsilon_limit is not None else self.epsilon
        return SitePolicy(epsilon_limit=limit, delta=self.delta,
                          accountant=self.accountant)  # type: ignore[arg-type]


def site_folder(root: Path, site: str) -> Path:
    """Return a site's privacy folder under ``root``, named safely after the site."""
    return root / re.sub(r"[^A-Za-z0-9._-]+", "_", site)


def check_model(model_factory: Callable[[], nn.Module], mode: str) -> None:
    """Raise UnsupportedLayerError, before round 1, for a model DP-SGD cannot train."""
    if mode == "record":
        model = model_factory()
        model.train()
        validate_for_dp(model)


def private_clients(sites: Sequence[PreparedSite],
                    model_factory: Callable[[], nn.Module], seed: int,
                    options: PrivacyOptions) -> list[PrivateSiteClient]:
    """Build one private client per site, writing missing policy files."""
    assert options.site_root is not None
    root = Path(options.site_root)
    clients = []
    for index, site in enumerate(sites):
        folder = site_folder(root, site.name)
        if not policy_path(folder).exists():
            path = write_policy(folder, options.site_policy())
            logger.info("dp: simulation wrote the policy of site %s at %s",
                        site.name, path)
        clients.append(PrivateSiteClient(
            site.name, model_factory, site.train_x, site.train_y, site.test_x,
            site.test_y, seed + index, folder, noise_seed=seed + 7717 * (index + 1)))
    return clients


def private_strategy(strategy: Strategy, options: PrivacyOptions, rounds: int,
                     num_sites: int, seed: int, secure_aggregation: bool = False
                     ) -> PrivateStrategy:
    """Wrap a strategy so its rounds run with the options' DP settings."""
    per_round = min(strategy.sites_per_round or num_sites, num_sites)
    settings = options.settings(rounds, secure_aggregation, per_round)
    return PrivateStrategy(strategy, settings, seed=seed)


RoundProgress = Callable[[int, dict[str, dict[str, float]], dict[str, float]], None]
"""Called with the round, its per-site test metrics and :func:`round_privacy`."""


@dataclass
class PrivateRun:
    """Results of a DP run: test metrics per round, final model, history."""

    label: str
    curve: list[dict[str, dict[str, float]]]
    model: ParameterSet
    history: list[RoundRecord]
    strategy: PrivateStrategy
    seconds: float
    compute_seconds: float


def run_private(strategy: Strategy, sites: Sequence[PreparedSite],
                model_factory: Callable[[], nn.Module], rounds: int, seed: int,
                options: PrivacyOptions, secure_aggregation: str = "off",
                progress: RoundProgress | None = None,
                evaluate_every: int = 1) -> PrivateRun:
    """Run one strategy with DP on private site clients, in process.

    ``secure_aggregation`` is off, secagg or secagg+. With it on, site-level
    noise is added by the sites in shares before masking, and the masking's
    per-value clip is widened so that noisy deltas are not clipped.
    """
    if getattr(strategy, "asynchronous", False) or strategy.name == "fedbuff":
        raise NotSupportedError(f"strategy {strategy.name!r} is asynchronous; DP "
                                "runs support synchronous rounds only")
    check_model(model_factory, options.mode)
    secure = secure_aggregation != "off"
    private = private_strategy(strategy, options, rounds, len(sites), seed, secure)
    initial = model_factory()
    params = get_params(initial)
    private.check_instructions(params, [s.name for s in sites], TRAINING_KEYS)
    clients = private_clients(sites, model_factory, seed, options)
    transport: Any = InProcessTransport(clients)
    if secure:
        transport = _secure_transport(secure_aggregation, private, transport, params)

    curve: list[dict[str, dict[str, float]]] = []

    def on_round(record: RoundRecord) -> None:
        log_round_privacy(record, rounds)
        if not record.eval_metrics:
            return
        curve.append(record.eval_metrics)
        if progress is not None:
            progress(record.server_round, record.eval_metrics, round_privacy(record))

    engine = RoundEngine(private, transport, rounds, seed=seed,
                         evaluate_every=evaluate_every, on_round=on_round)
    started = time.perf_counter()
    final = engine.run(params, trainable_names(initial))
    seconds = time.perf_counter() - started
    compute = sum(m.get("train_seconds", 0.0) + m.get("eval_seconds", 0.0)
                  for r in engine.history
                  for m in [*r.train_metrics.values(), *r.eval_metrics.values()])
    return PrivateRun(private.name, curve, final, engine.history, private, seconds,
                      compute)


def run_private_spec(spec: Any, sites: Sequence[PreparedSite],
                     model_factory: Callable[[], nn.Module], settings: Any,
                     options: PrivacyOptions,
                     progress: RoundProgress | None = None,
                     secure_aggregation: str | None = None) -> Any:
    """Run one strategy of a simulation with DP; return a ``FederatedRun``.

    ``spec`` and ``settings`` are the simulation's
    :class:`~prifed.strategies.StrategySpec` and
    :class:`~prifed.federated.RunSettings`. Rounds run in wall-clock time:
    simulated site speeds and availability do not apply to DP runs.
    ``secure_aggregation`` (off, secagg, secagg+) masks the updates; it
    defaults to the mode in ``settings``.
    """
    from prifed.federated import FederatedRun, build_spec_strategy

    if settings.profiles:
        raise NotSupportedError("simulated site speeds and availability do not "
                                "apply to DP runs; leave them unset")
    strategy = build_spec_strategy(spec, settings)
    if secure_aggregation is None:
        secure_aggregation = getattr(settings, "secure_aggregation", "off")
    run = run_private(strategy, sites, model_factory, settings.rounds, settings.seed,
                      options, secure_aggregation, progress,
                      getattr(settings, "evaluate_every", 1))
    return FederatedRun(run.label, run.curve, [], run.model, run.history,
                        run.seconds, run.compute_seconds, asynchronous=False)


def _secure_transport(mode: str, strategy: PrivateStrategy, inner: Any,
                      params: ParameterSet) -> Any:
    from prifed.secagg.config import SecAggConfig
    from prifed.secagg.encoding import FixedPoint
    from prifed.secagg.transport import secure_transport

    settings = strategy.settings
    config = SecAggConfig(mode=mode)
    if settings.mode == "site":
        assert settings.noise_multiplier is not None and settings.min_sites
        bound = secagg_value_bound(settings.noise_multiplier, settings.clip_norm,
                                   settings.min_sites)
        config = SecAggConfig(mode=mode, encoding=FixedPoint(
            clip=max(bound, config.encoding.clip)))
    return secure_transport(mode, strategy, inner, params, strategy.sites_per_round,
                            config=config)


def round_privacy(record: RoundRecord) -> dict[str, float]:
    """Return the largest epsilon any site reported this round, if any."""
    spent = [_reported(m["dp_epsilon"]) for m in record.train_metrics.values()
             if "dp_epsilon" in m]
    return {"epsilon": max(spent)} if spent else {}


def log_round_privacy(record: RoundRecord, num_rounds: int) -> None:
    """Log each site's reported spend and the refusals of one round."""
    label = round_label(record.server_round, num_rounds)
    for site, metrics in sorted(record.train_metrics.items()):
        if "dp_epsilon" in metrics:
            logger.info("privacy %s: site %s has spent epsilon %s at delta %g",
                        label, site, format_epsilon(_reported(metrics["dp_epsilon"])),
                        metrics["dp_delta"])
    refused = [site for site, reason in record.failures.items()
               if reason.startswith(BudgetExhausted.__name__)]
    if refused:
        logger.warning("privacy %s: %d sites rejected the round on their budget: %s",
                       label, len(refused), ", ".join(sorted(refused)))


def privacy_summary(history: Sequence[RoundRecord], options: PrivacyOptions
                    ) -> dict[str, Any]:
    """Summarise epsilon and delta per site and for the federation.

    Record level: each record lives at one site, so the federation's epsilon
    is the largest site's (parallel composition). Site level: each site's
    epsilon covers its whole data set, and the federation's is again the
    largest. Values come from the sites' replies; infinity is written "inf".
    """
    if not options.enabled:
        return {"mode": "off", "trust": TRUST["off"]}
    per_site: dict[str, dict[str, Any]] = {}
    at_sites = False
    for record in history:
        for site, metrics in record.train_metrics.items():
            if "dp_epsilon" not in metrics:
                continue
            entry = per_site.setdefault(site, {"rounds_trained": 0})
            entry["rounds_trained"] += 1
            entry["epsilon"] = _reported(metrics["dp_epsilon"])
            entry["delta"] = metrics["dp_delta"]
            entry["epsilon_limit"] = _reported(metrics["dp_epsilon_limit"])
            entry["noise_multiplier"] = metrics["dp_noise_multiplier"]
            entry["sample_rate"] = metrics["dp_sample_rate"]
            at_sites = at_sites or metrics.get("dp_noise_at_sites", 0.0) > 0
        for site, reason in record.failures.items():
            entry = per_site.setdefault(site, {"rounds_trained": 0})
            entry.setdefault("refusals", []).append(
                {"round": record.server_round, "reason": reason})
    epsilons = [e["epsilon"] for e in per_site.values() if "epsilon" in e]
    deltas = [e["delta"] for e in per_site.values() if "delta" in e]
    placement = options.mode
    if options.mode == "site":
        placement = "sites" if at_sites else "coordinator"
    return {
        "mode": options.mode,
        "trust": TRUST[placement],
        "accountant": options.accountant,
        "target_epsilon": options.epsilon,
        "clip_norm": options.clip,
        "federation": {"epsilon": _json_float(max(epsilons)) if epsilons else None,
                       "delta": max(deltas) if deltas else None},
        "per_site": {site: {key: _json_float(value) if isinstance(value, float)
                            else value for key, value in entry.items()}
                     for site, entry in sorted(per_site.items())},
    }


def _reported(value: float | None) -> float:
    # A JSON transport sends infinities as null; both mean "no finite value".
    return math.inf if value is None else float(value)


def _json_float(value: float) -> float | str:
    return "inf" if math.isinf(value) else round(value, 6)


def describe_spend(summary: Mapping[str, Any]) -> str:
    """Return the lines under the results table: epsilon and delta spent."""
    if summary.get("mode", "off") == "off":
        return "no differential privacy"
    federation = summary["federation"]
    if federation["epsilon"] is None:
        return f"DP at {summary['mode']} level: no site trained"
    sites = ", ".join(f"{site} {_short(entry.get('epsilon'))}"
                      for site, entry in summary["per_site"].items())
    return (f"DP at {summary['mode']} level: epsilon spent "
            f"{_short(federation['epsilon'])} at delta {federation['delta']:g} for "
            f"the federation; per site {sites}")


def _short(value: float | str | None) -> str:
    if value is None or isinstance(value, str):
        return str(value or "none")
    return f"{value:.3g}"

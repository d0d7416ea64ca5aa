"""The federation config file (TOML): roster, training settings, rounds and limits.

Relative paths in the file are relative to the file's own folder. Unknown keys
are errors, so a misspelt setting never falls back to a default silently.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prifed.deploy.dpsite import PrivacySection
from prifed.deploy.fhirsite import FhirSection
from prifed.deploy.heconfig import HomomorphicSection
from prifed.errors import ConfigError
from prifed.training import check_batch_size

MIB = 1024 * 1024


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FederationSection(_Section):
    """Who takes part: the federation's name, its sites in order and the seed.

    The order of ``sites`` sets each site's seed offset and the order in which
    sums run, so list sites in the order ``prifed simulate`` reads them (first
    appearance in the CSV) for a run that matches a simulation.
    """

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    sites: list[str] = Field(min_length=1)
    seed: int = 42

    @model_validator(mode="after")
    def _check_sites(self) -> FederationSection:
        seen: set[str] = set()
        for site in self.sites:
            if not site.strip() or len(site) > 100 or not site.isprintable():
                raise ValueError(f"site names must be 1-100 printable characters; "
                                 f"got {site!r}")
            if site in seen:
                raise ValueError(f"site {site!r} is listed twice")
            seen.add(site)
        return self


class TrainingSection(_Section):
    """The model, the strategy and the sites' local training settings."""

    model: str = "logreg"
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    rounds: int = Field(default=15, ge=1)
    sites_per_round: int | None = Field(default=None, ge=1)
    local_steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=4, ge=1)
    lr: float = Field(default=0.01, gt=0)
    optimizer: str = "sgd"
    standardize: str = "federated"
    test_fraction: float = Field(default=0.34, gt=0, lt=1)
    evaluate_every: int = Field(default=1, ge=1)
    numeric: list[str] | None = None
    categorical: list[str] | None = None
    secure_aggregation: Literal["off", "secagg", "secagg+"] = "off"
    """secagg or secagg+: sites send a masked sum, never their updates."""

    @model_validator(mode="after")
    def _batch_fits_model(self) -> TrainingSection:
        check_batch_size(self.model, self.batch_size)
        return self

    @model_validator(mode="after")
    def _asynchronous_alone(self) -> TrainingSection:
        if self.strategy.lower() == "fedbuff" and self.secure_aggregation != "off":
            raise ValueError("strategy 'fedbuff' weighs each update by its own "
                             "staleness, so it cannot run on masked sums; set "
                             "secure_aggregation = \"off\" or choose a synchronous "
                             "strategy such as fedavg")
        return self

    def local_config(self) -> dict[str, Any]:
        """Return the settings every site receives with its training task."""
        return {"local_steps": self.local_steps, "batch_size": self.batch_size,
                "lr": self.lr, "optimizer": self.optimizer}


class RoundsSection(_Section):
    """Deadlines, the minimum number of replies and how often a round is retried."""

    deadline_seconds: float = Field(default=300.0, gt=0)
    min_sites: int = Field(default=1, ge=1)
    attempts: int = Field(default=3, ge=1)
    evaluate_deadline_seconds: float = Field(default=120.0, gt=0)
    setup_deadline_seconds: float = Field(default=900.0, gt=0)
    phase_deadline_seconds: float = Field(default=60.0, gt=0)
    """Deadline of each secure-aggregation phase; silent sites count as dropped."""
    ordered_replies: bool = True


class CoordinatorSection(_Section):
    """Listening address, state locations and service limits of the coordinator."""

    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    state_dir: Path = Path("state")
    pki_dir: Path = Path("pki")
    database: str | None = None
    long_poll_seconds: float = Field(default=25.0, gt=0, le=300)
    linger_seconds: float = Field(default=60.0, ge=0)
    keep_updates: bool = False
    max_connections: int | None = Field(default=None, ge=1)


class LimitsSection(_Section):
    """Sizes and clock skew the coordinator accepts from sites."""

    max_update_bytes: int = Field(default=512 * MIB, ge=1024)
    max_chunk_bytes: int = Field(default=8 * MIB, ge=1024)
    max_json_bytes: int = Field(default=1 * MIB, ge=1024)
    max_exchange_bytes: int = Field(default=16 * MIB, ge=1024)
    clock_skew_seconds: float = Field(default=300.0, gt=0)
    concurrent_validations: int = Field(default=2, ge=1)


class FederationConfig(_Section):
    """A whole federation config file."""

    federation: FederationSection
    training: TrainingSection = TrainingSection()
    rounds: RoundsSection = RoundsSection()
    coordinator: CoordinatorSection = CoordinatorSection()
    limits: LimitsSection = LimitsSection()
    privacy: PrivacySection | None = None
    fhir: FhirSection | None = None
    homomorphic: HomomorphicSection | None = None
    base_dir: Path = Path(".")

    @model_validator(mode="after")
    def _check_counts(self) -> FederationConfig:
        num_sites = len(self.federation.sites)
        if self.rounds.min_sites > num_sites:
            raise ValueError(f"rounds.min_sites must be at most the number of sites "
                             f"({num_sites}); got {self.rounds.min_sites}")
        per_round = self.training.sites_per_round
        if per_round is not None and per_round > num_sites:
            raise ValueError(f"training.sites_per_round must be at most the number of "
                             f"sites ({num_sites}); got {per_round}")
        if per_round is not None and self.rounds.min_sites > per_round:
            raise ValueError(f"rounds.min_sites ({self.rounds.min_sites}) must be at "
                             f"most training.sites_per_round ({per_round}), or no "
                             "round could ever close")
        return self

    @model_validator(mode="after")
    def _asynchronous_without_sums(self) -> FederationConfig:
        if self.training.strategy.lower() != "fedbuff":
            return self
        buffer_size = self.training.strategy_options.get("buffer_size", 2)
        budget = self.training.rounds * len(self.federation.sites)
        if isinstance(buffer_size, int) and buffer_size > budget:
            raise ValueError(f"training.strategy_options.buffer_size ({buffer_size}) "
                             f"is larger than the run's {budget} tasks (rounds times "
                             "sites), so no model version would ever be made; "
                             "lower buffer_size or raise training.rounds")
        for section in ("privacy", "homomorphic"):
            if getattr(self, section) is not None:
                raise ValueError(f"strategy 'fedbuff' cannot be combined with a "
                                 f"[{section}] section yet: its accounting and sums "
                                 "assume synchronous rounds; remove the section or "
                                 "choose a synchronous strategy such as fedavg")
        return self

    @property
    def state_dir(self) -> Path:
        return self._resolve(self.coordinator.state_dir)

    @property
    def pki_dir(self) -> Path:
        return self._resolve(self.coordinator.pki_dir)

    @property
    def database_url(self) -> str:
        if self.coordinator.database:
            return self.coordinator.database
        return f"sqlite:///{self.state_dir / 'coordinator.db'}"

    def _resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def fingerprint(self) -> dict[str, Any]:
        """Return the settings a resumed run must share with the run it continues."""
        return {"federation": self.federation.model_dump(mode="json"),
                "training": self.training.model_dump(mode="json")}

    def fingerprint_digest(self) -> str:
        """Return the SHA-256 of :meth:`fingerprint` in canonical JSON."""
        text = json.dumps(self.fingerprint(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def load_config(path: Path) -> FederationConfig:
    """Read and validate a federation config file; raise ConfigError naming the key."""
    if not path.is_file():
        raise ConfigError(f"federation config not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"federation config {path} is not valid TOML: {error}") \
            from None
    return parse_config(raw, path.parent.resolve(), str(path))


def parse_config(raw: dict[str, Any], base_dir: Path,
                 source: str = "federation config") -> FederationConfig:
    """Validate a config already parsed from TOML; every error is listed."""
    if "base_dir" in raw:
        raise ConfigError(f"{source}: base_dir is not a setting")
    try:
        return FederationConfig(**raw, base_dir=base_dir)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"]) or "(top level)"
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}")
        raise ConfigError(f"{source} is invalid: " + "; ".join(problems)) from None

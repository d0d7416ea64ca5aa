"""A site's privacy ledger: every round's spend, kept on disk beside its data.

The ledger is an SQLite file in the site's privacy folder. Each row is one
round's release: the mechanism (noise multiplier, sampling rate, steps, clip
norm) and the site's total epsilon after it. Totals are recomputed from all
recorded mechanisms, across runs, so they survive restarts and new runs.
Triggers make the table append-only: rows cannot be updated or deleted
through SQLite, and no PriFed code path removes rows. The coordinator never
learns the ledger's path and has no message that touches it.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from prifed.errors import ConfigError
from prifed.log import get_logger
from prifed.privacy.accountant import GaussianEvent, compute_epsilon
from prifed.privacy.errors import BudgetExhausted
from prifed.privacy.policy import SitePolicy

logger = get_logger(__name__)

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS spend (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    recorded_at TEXT NOT NULL,
    run_id TEXT NOT NULL,
    server_round INTEGER NOT NULL,
    mode TEXT NOT NULL,
    noise_placement TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    clip_norm REAL NOT NULL,
    epsilon_total REAL NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS spend_no_update BEFORE UPDATE ON spend
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS spend_no_delete BEFORE DELETE ON spend
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
"""

_COLUMNS = ("recorded_at", "run_id", "server_round", "mode", "noise_placement",
            "noise_multiplier", "sample_rate", "steps", "clip_norm",
            "epsilon_total", "delta", "accountant")


@dataclass(frozen=True)
class LedgerEntry:
    """One recorded round: its mechanism and the site's total spend after it."""

    recorded_at: str
    run_id: str
    server_round: int
    mode: str
    noise_placement: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    epsilon_total: float
    delta: float
    accountant: str

    @property
    def event(self) -> GaussianEvent:
        """Return the mechanism of this round for the accountant."""
        return GaussianEvent(self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyLedger:
    """The append-only record of one site's privacy spend."""

    def __init__(self, path: Path, site: str) -> None:
        self.path = path
        self.site = site
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as connection:
            connection.executescript(_SCHEMA)
            self._claim(connection)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=30)) as connection:
            with connection:
                yield connection

    def _claim(self, connection: sqlite3.Connection) -> None:
        """Tie the file to this site, so one site never reads another's spend."""
        rows = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        if not rows:
            connection.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("schema_version", SCHEMA_VERSION), ("site", self.site),
                 ("created_at", _now())])
            return
        if rows.get("site") != self.site:
            raise ConfigError(f"privacy ledger {self.path} belongs to site "
                              f"{rows.get('site')!r}, not {self.site!r}")
        if rows.get("schema_version") != SCHEMA_VERSION:
            raise ConfigError(f"privacy ledger {self.path} has schema version "
                              f"{rows.get('schema_version')!r}; this PriFed reads "
                              f"version {SCHEMA_VERSION}")

    def entries(self) -> list[LedgerEntry]:
        """Return every recorded round, oldest first."""
        with self._connect() as connection:
            rows = connection.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM spend ORDER BY id").fetchall()
        return [LedgerEntry(*row) for row in rows]

    def events(self) -> list[GaussianEvent]:
        """Return the mechanisms of every recorded round."""
        return [entry.event for entry in self.entries()]

    def spent(self, policy: SitePolicy) -> float:
        """Return the total epsilon spent, at the policy's delta and accountant."""
        return compute_epsilon(self.events(), policy.delta, policy.accountant)

    def check(self, event: GaussianEvent, policy: SitePolicy, policy_file: str
              ) -> float:
        """Return the total epsilon after ``event``; raise if it passes the limit."""
        events = self.events()
        projected = compute_epsilon(events + [event], policy.delta,
                                    policy.accountant)
        if projected > policy.limit:
            spent = compute_epsilon(events, policy.delta, policy.accountant)
            raise BudgetExhausted(self.site, spent, projected, policy.limit,
                                  policy.delta, len(events), policy_file)
        return projected

    def record(self, event: GaussianEvent, policy: SitePolicy, *, run_id: str,
               server_round: int, mode: str, noise_placement: str,
               clip_norm: float) -> LedgerEntry:
        """Append one round's release and return the entry with the new total."""
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            rows = connection.execute(
                "SELECT noise_multiplier, sample_rate, steps FROM spend").fetchall()
            events = [GaussianEvent(*row) for row in rows] + [event]
            total = compute_epsilon(events, policy.delta, policy.accountant)
            entry = LedgerEntry(_now(), run_id, server_round, mode, noise_placement,
                                event.noise_multiplier, event.sample_rate,
                                event.steps, clip_norm, total, policy.delta,
                                policy.accountant)
            connection.execute(
                f"INSERT INTO spend ({', '.join(_COLUMNS)}) VALUES "
                f"({', '.join('?' for _ in _COLUMNS)})",
                [getattr(entry, column) for column in _COLUMNS])
        logger.info("ledger: site %s recorded round %d (%s), epsilon %s at delta %g",
                    self.site, server_round, mode, format_epsilon(total),
                    policy.delta)
        return entry


def ledger_site(path: Path) -> str:
    """Return the site a ledger file belongs to, without claiming it."""
    if not path.is_file():
        raise ConfigError(f"no privacy ledger at {path}")
    with closing(sqlite3.connect(path)) as connection:
        row = connection.execute("SELECT value FROM meta WHERE key = 'site'"
                                 ).fetchone()
    if row is None:
        raise ConfigError(f"privacy ledger {path} names no site")
    return str(row[0])


def format_epsilon(value: float) -> str:
    """Format an epsilon for people: four significant digits, or inf."""
    return "inf" if math.isinf(value) else f"{value:.4g}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")

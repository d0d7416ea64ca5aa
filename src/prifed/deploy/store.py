"""The coordinator's durable state: an SQL database plus files in the state folder.

SQLite by default, through SQLAlchemy, so a PostgreSQL URL works too. Rows
hold sites, join tokens, nonces, rounds, accepted updates, evaluations,
exchange replies and global model versions; tensors live in safetensors files
next to the database. A file is written and renamed into place before the row
that names it is committed, so a crash at any moment leaves either no row or a
complete file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (Float, ForeignKey, Integer, LargeBinary, String, Text,
                        create_engine, delete, event, select)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from prifed.deploy.errors import RequestRejected
from prifed.errors import ConfigError

SITE_INVITED = "invited"
SITE_JOINED = "joined"
SITE_REVOKED = "revoked"


class Base(DeclarativeBase):
    """Declarative base of the coordinator's tables."""


class MetaRow(Base):
    """Run-wide values: config fingerprint, preprocessors, status."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class SiteRow(Base):
    """One site of the roster, its public key once joined, and its status."""

    __tablename__ = "sites"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=SITE_INVITED)
    public_key: Mapped[bytes | None] = mapped_column(LargeBinary(32), nullable=True)
    joined_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)


class TokenRow(Base):
    """A one-time join token, stored as its SHA-256 only."""

    __tablename__ = "join_tokens"
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    site: Mapped[str] = mapped_column(ForeignKey("sites.name"))
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class NonceRow(Base):
    """A request nonce already seen from a site, kept for the clock-skew window."""

    __tablename__ = "nonces"
    site: Mapped[str] = mapped_column(String(100), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(32), primary_key=True)
    seen_at: Mapped[float] = mapped_column(Float, index=True)


class RoundRow(Base):
    """One training round: its instructions, attempt, times and final record."""

    __tablename__ = "rounds"
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    instructions: Mapped[str] = mapped_column(Text)
    opened_at: Mapped[float] = mapped_column(Float)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    record: Mapped[str | None] = mapped_column(Text, nullable=True)


class UpdateRow(Base):
    """An accepted update: validated, on disk, counted once in its round."""

    __tablename__ = "updates"
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    site: Mapped[str] = mapped_column(String(100), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    num_samples: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[str] = mapped_column(Text)
    accepted_at: Mapped[float] = mapped_column(Float)


class SiteFailureRow(Base):
    """A site's own report that it cannot train in a round."""

    __tablename__ = "site_failures"
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    site: Mapped[str] = mapped_column(String(100), primary_key=True)
    reason: Mapped[str] = mapped_column(Text)


class UploadRow(Base):
    """An upload in progress; its bytes so far are in ``uploads/<id>.part``."""

    __tablename__ = "uploads"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    site: Mapped[str] = mapped_column(String(100))
    round: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    num_samples: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class EvaluationRow(Base):
    """One site's metrics of the global model after a round."""

    __tablename__ = "evaluations"
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    site: Mapped[str] = mapped_column(String(100), primary_key=True)
    num_samples: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[str] = mapped_column(Text)


class ExchangeReplyRow(Base):
    """A site's reply in a relayed exchange (statistics, extension protocols)."""

    __tablename__ = "exchange_replies"
    exchange: Mapped[str] = mapped_column(String(100), primary_key=True)
    site: Mapped[str] = mapped_column(String(100), primary_key=True)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[float] = mapped_column(Float)


class ModelRow(Base):
    """A global model version with the engine and strategy state after its round."""

    __tablename__ = "models"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    strategy_state: Mapped[str] = mapped_column(Text)
    strategy_arrays: Mapped[str | None] = mapped_column(Text, nullable=True)
    rng_state: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class SiteInfo:
    """A roster entry as stored: position, status, public key and last contact."""

    name: str
    position: int
    status: str
    public_key: bytes | None
    last_seen: float | None


@dataclass(frozen=True)
class AcceptedUpdate:
    """An accepted update of a round, as stored."""

    site: str
    sha256: str
    path: Path
    num_samples: int
    metrics: dict[str, float | None]


def open_engine(url: str, synchronous: str = "FULL") -> Engine:
    """Create the SQLAlchemy engine; SQLite gets WAL, a sync level and a busy timeout.

    ``synchronous="FULL"`` makes every commit survive a power loss;
    ``"NORMAL"`` survives a killed process only, at a fraction of the cost.
    """
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False,
                                                  "timeout": 30})

        def pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        event.listen(engine, "connect", pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


class Store:
    """Durable state of one federation run; every method is one transaction."""

    def __init__(self, url: str, state_dir: Path) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        for folder in ("models", "updates", "uploads"):
            (state_dir / folder).mkdir(exist_ok=True)
        self.engine = open_engine(url)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Nonces and last-seen times are written on every request. Losing the
        # last few to a power cut only reopens a replay window of seconds, so
        # they skip the full sync that protects updates and models.
        self.fast_engine = open_engine(url, synchronous="NORMAL")
        self._fast_sessions = sessionmaker(self.fast_engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Open a session that commits on success and rolls back on error."""
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def fast_session(self) -> Iterator[Session]:
        """Open a session whose commits skip the full sync (nonces, last seen)."""
        with self._fast_sessions.begin() as session:
            yield session

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()
        self.fast_engine.dispose()

    # Run-wide values.

    def get_meta(self, key: str) -> Any:
        """Return a run-wide JSON value, or None when it was never set."""
        with self.session() as session:
            row = session.get(MetaRow, key)
            return None if row is None else json.loads(row.value)

    def set_meta(self, key: str, value: Any) -> None:
        """Store a run-wide JSON value."""
        with self.session() as session:
            session.merge(MetaRow(key=key, value=json.dumps(value)))

    def meta_items(self, prefix: str) -> list[tuple[str, Any]]:
        """Return the run-wide values whose keys start with ``prefix``, by key."""
        with self.session() as session:
            rows = session.scalars(select(MetaRow).where(
                MetaRow.key.startswith(prefix, autoescape=True)).order_by(MetaRow.key))
            return [(row.key, json.loads(row.value)) for row in rows]

    def bind_config(self, fingerprint: dict[str, Any], digest: str) -> None:
        """Remember the config of this run, or refuse a different one on resume."""
        stored = self.get_meta("config_digest")
        if stored is None:
            self.set_meta("config", fingerprint)
            self.set_meta("config_digest", digest)
            return
        if stored != digest:
            before = self.get_meta("config") or {}
            changed = _changed_keys(before, fingerprint)
            raise ConfigError(
                f"the state folder {self.state_dir} belongs to a run started with a "
                f"different config (changed: {', '.join(changed) or 'unknown'}); "
                "restore the old settings to resume, or use a new state_dir")

    # Sites, tokens and nonces.

    def sync_roster(self, names: list[str]) -> None:
        """Insert roster sites that are new; positions follow the config order."""
        with self.session() as session:
            for position, name in enumerate(names):
                row = session.get(SiteRow, name)
                if row is None:
                    session.add(SiteRow(name=name, position=position))
                else:
                    row.position = position

    def site(self, name: str) -> SiteInfo | None:
        """Return one site, or None when it is not in the roster."""
        with self.session() as session:
            row = session.get(SiteRow, name)
            return None if row is None else _site_info(row)

    def sites(self) -> list[SiteInfo]:
        """Return the roster in config order."""
        with self.session() as session:
            rows = session.scalars(select(SiteRow).order_by(SiteRow.position))
            return [_site_info(row) for row in rows]

    def add_token(self, site: str, digest: str, valid_seconds: float) -> None:
        """Store a join token's digest; an earlier unused token of the site lapses."""
        now = time.time()
        with self.session() as session:
            row = session.get(SiteRow, site)
            if row is None:
                raise ConfigError(f"site {site!r} is not in the federation's roster; "
                                  "add it to federation.sites first")
            for old in session.scalars(select(TokenRow).where(
                    TokenRow.site == site, TokenRow.used_at.is_(None))):
                old.expires_at = min(old.expires_at, now)
            session.add(TokenRow(digest=digest, site=site, created_at=now,
                                 expires_at=now + valid_seconds))

    def redeem_token(self, site: str, digest: str, public_key: bytes) -> None:
        """Bind a site to its public key with a one-time token (401/403 if not)."""
        now = time.time()
        with self.session() as session:
            row = session.get(SiteRow, site)
            if row is None:
                raise RequestRejected(403, "unknown_site",
                                      f"site {site!r} is not in this federation's "
                                      "roster")
            token = session.get(TokenRow, digest)
            if token is None or token.site != site:
                raise RequestRejected(401, "bad_token",
                                      f"join token is not valid for site {site!r}")
            if token.used_at is not None and row.status == SITE_JOINED and \
                    row.public_key == public_key:
                # The same join again, such as a retry after a lost response.
                return
            if token.used_at is not None:
                raise RequestRejected(401, "bad_token",
                                      f"join token for site {site!r} was already "
                                      "used; ask the federation operator for a new "
                                      "one")
            if token.expires_at < now:
                raise RequestRejected(401, "bad_token",
                                      f"join token for site {site!r} has expired or "
                                      "was replaced")
            token.used_at = now
            row.public_key = public_key
            row.status = SITE_JOINED
            row.joined_at = now
            row.last_seen = now

    def revoke(self, site: str) -> None:
        """Revoke a site: its key and unused tokens stop working at once."""
        now = time.time()
        with self.session() as session:
            row = session.get(SiteRow, site)
            if row is None:
                raise ConfigError(f"site {site!r} is not in the federation's roster")
            row.status = SITE_REVOKED
            row.public_key = None
            for token in session.scalars(select(TokenRow).where(
                    TokenRow.site == site, TokenRow.used_at.is_(None))):
                token.expires_at = min(token.expires_at, now)

    def touch(self, site: str) -> None:
        """Record that a site was just seen."""
        with self.fast_session() as session:
            row = session.get(SiteRow, site)
            if row is not None:
                row.last_seen = time.time()

    def record_nonce(self, site: str, nonce: str, window_seconds: float) -> None:
        """Store a nonce, raising 401 if the site already used it (a replay)."""
        now = time.time()
        try:
            with self.fast_session() as session:
                session.add(NonceRow(site=site, nonce=nonce, seen_at=now))
        except IntegrityError:
            raise RequestRejected(401, "replayed_request",
                                  f"nonce was already used by site {site!r}; the "
                                  "request is a replay") from None

    def purge_nonces(self, older_than: float) -> int:
        """Forget nonces seen before ``older_than``, whose timestamps are stale."""
        with self.fast_session() as session:
            result = session.execute(delete(NonceRow).where(
                NonceRow.seen_at < older_than))
            return int(getattr(result, "rowcount", 0) or 0)

    # Rounds, updates, uploads.

    def round_row(self, number: int) -> dict[str, Any] | None:
        """Return a round as a dict, or None when it never opened."""
        with self.session() as session:
            row = session.get(RoundRow, number)
            if row is None:
                return None
            return {"number": row.number, "status": row.status,
                    "attempt": row.attempt,
                    "instructions": json.loads(row.instructions),
                    "opened_at": row.opened_at, "closed_at": row.closed_at,
                    "record": None if row.record is None else json.loads(row.record)}

    def open_round(self, number: int, instructions: list[dict[str, Any]]) -> None:
        """Record that a round opened with these instructions."""
        with self.session() as session:
            session.add(RoundRow(number=number, status="open", attempt=1,
                                 instructions=json.dumps(instructions),
                                 opened_at=time.time()))

    def set_attempt(self, number: int, attempt: int) -> None:
        """Record that a round started another attempt."""
        with self.session() as session:
            row = session.get(RoundRow, number)
            if row is not None:
                row.attempt = attempt

    def close_round(self, number: int) -> None:
        """Record that a round stopped taking updates."""
        with self.session() as session:
            row = session.get(RoundRow, number)
            if row is not None and row.status == "open":
                row.status = "closed"
                row.closed_at = time.time()

    def accepted_updates(self, number: int) -> dict[str, AcceptedUpdate]:
        """Return a round's accepted updates by site."""
        with self.session() as session:
            rows = session.scalars(select(UpdateRow).where(UpdateRow.round == number))
            return {row.site: AcceptedUpdate(row.site, row.sha256, Path(row.path),
                                             row.num_samples, json.loads(row.metrics))
                    for row in rows}

    def accept_update(self, number: int, site: str, sha256: str, path: Path,
                      size: int, num_samples: int,
                      metrics: dict[str, float | None], upload_id: str) -> None:
        """Record an accepted update and drop its finished upload, in one commit."""
        with self.session() as session:
            session.add(UpdateRow(round=number, site=site, sha256=sha256,
                                  path=str(path), size=size, num_samples=num_samples,
                                  metrics=json.dumps(metrics), accepted_at=time.time()))
            upload = session.get(UploadRow, upload_id)
            if upload is not None:
                session.delete(upload)

    def accepted_by(self, site: str) -> list[tuple[int, str, int]]:
        """Return the round, SHA-256 and sample count of each update a site got in."""
        with self.session() as session:
            rows = session.scalars(select(UpdateRow).where(UpdateRow.site == site))
            return [(row.round, row.sha256, row.num_samples) for row in rows]

    def site_failures(self, number: int) -> dict[str, str]:
        """Return the failures sites reported themselves in a round."""
        with self.session() as session:
            rows = session.scalars(select(SiteFailureRow).where(
                SiteFailureRow.round == number))
            return {row.site: row.reason for row in rows}

    def record_site_failure(self, number: int, site: str, reason: str) -> None:
        """Store a site's own failure report for a round."""
        with self.session() as session:
            session.merge(SiteFailureRow(round=number, site=site, reason=reason))

    def upload(self, upload_id: str) -> UploadRow | None:
        """Return an upload in progress, or None."""
        with self.session() as session:
            return session.get(UploadRow, upload_id)

    def create_upload(self, row: UploadRow) -> UploadRow:
        """Store a new upload, or return the one already stored under its id."""
        try:
            with self.session() as session:
                session.add(row)
        except IntegrityError:
            existing = self.upload(row.id)
            if existing is None:
                raise
            return existing
        return row

    def delete_upload(self, upload_id: str) -> None:
        """Forget one upload, such as one whose payload failed validation."""
        with self.session() as session:
            row = session.get(UploadRow, upload_id)
            if row is not None:
                session.delete(row)

    def uploads_of_round(self, number: int) -> list[UploadRow]:
        """Return the uploads still open for a round."""
        with self.session() as session:
            return list(session.scalars(select(UploadRow).where(
                UploadRow.round == number)))

    def delete_uploads(self, number: int) -> list[str]:
        """Forget a round's unfinished uploads; return their ids."""
        with self.session() as session:
            rows = list(session.scalars(select(UploadRow).where(
                UploadRow.round <= number)))
            for row in rows:
                session.delete(row)
            return [row.id for row in rows]

    # Evaluations and exchanges.

    def evaluations(self, number: int) -> dict[str, tuple[int, dict[str, Any]]]:
        """Return a round's evaluation replies by site."""
        with self.session() as session:
            rows = session.scalars(select(EvaluationRow).where(
                EvaluationRow.round == number))
            return {row.site: (row.num_samples, json.loads(row.metrics))
                    for row in rows}

    def record_evaluation(self, number: int, site: str, num_samples: int,
                          metrics: dict[str, float | None]) -> None:
        """Store (or replace) one site's evaluation of a round's model."""
        with self.session() as session:
            session.merge(EvaluationRow(round=number, site=site,
                                        num_samples=num_samples,
                                        metrics=json.dumps(metrics)))

    def exchange_replies(self, exchange: str) -> dict[str, bytes]:
        """Return the replies stored for an exchange, by site."""
        with self.session() as session:
            rows = session.scalars(select(ExchangeReplyRow).where(
                ExchangeReplyRow.exchange == exchange))
            return {row.site: row.body for row in rows}

    def delete_exchange_replies(self, prefix: str) -> int:
        """Delete the stored replies of exchanges whose ids start with ``prefix``."""
        with self.session() as session:
            result = session.execute(delete(ExchangeReplyRow).where(
                ExchangeReplyRow.exchange.startswith(prefix, autoescape=True)))
            return int(getattr(result, "rowcount", 0) or 0)

    def record_exchange_reply(self, exchange: str, site: str, body: bytes) -> bool:
        """Store a reply; return False if the site already replied (kept unchanged)."""
        try:
            with self.session() as session:
                session.add(ExchangeReplyRow(exchange=exchange, site=site, body=body,
                                             received_at=time.time()))
        except IntegrityError:
            return False
        return True

    # Global model versions.

    def latest_model(self) -> ModelRow | None:
        """Return the newest committed model version, or None before the first."""
        with self.session() as session:
            return session.scalars(select(ModelRow).order_by(
                ModelRow.version.desc()).limit(1)).first()

    def model(self, version: int) -> ModelRow | None:
        """Return one committed model version."""
        with self.session() as session:
            return session.get(ModelRow, version)

    def commit_model(self, row: ModelRow, record: dict[str, Any] | None) -> None:
        """Commit a model version and, for a round, mark the round done."""
        with self.session() as session:
            session.merge(row)
            if record is not None:
                round_row = session.get(RoundRow, row.version)
                if round_row is not None:
                    round_row.status = "done"
                    round_row.record = json.dumps(record)
                    if round_row.closed_at is None:
                        round_row.closed_at = time.time()

    def round_records(self) -> list[dict[str, Any]]:
        """Return the records of all finished rounds, in order."""
        with self.session() as session:
            rows = session.scalars(select(RoundRow).where(
                RoundRow.status == "done").order_by(RoundRow.number))
            return [json.loads(row.record) for row in rows if row.record]

    def rounds(self) -> list[dict[str, Any]]:
        """Return every round's number, status, attempt and times."""
        with self.session() as session:
            rows = session.scalars(select(RoundRow).order_by(RoundRow.number))
            return [{"number": r.number, "status": r.status, "attempt": r.attempt,
                     "opened_at": r.opened_at, "closed_at": r.closed_at}
                    for r in rows]


def _site_info(row: SiteRow) -> SiteInfo:
    return SiteInfo(row.name, row.position, row.status, row.public_key, row.last_seen)


def _changed_keys(before: dict[str, Any], after: dict[str, Any],
                  prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(before) | set(after)):
        left, right = before.get(key), after.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            changed += _changed_keys(left, right, f"{prefix}{key}.")
        elif left != right:
            changed.append(f"{prefix}{key}")
    return changed


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file by renaming a synced temporary file over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries to disk so a rename survives a crash."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

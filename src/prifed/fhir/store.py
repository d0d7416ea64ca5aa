"""An on-disk SQLite spill that groups extracted values by patient.

A bulk export writes each resource type to its own file, so the records of
one patient are spread across the whole export. The first pass reduces each
resource to a few facts (a feature slot, a day and a number) and appends them
here. The second pass reads them back ordered by patient, one patient at a
time. SQLite sorts on disk with a bounded page cache, so memory stays flat as
the export grows. The database lives in a private temporary folder and is
deleted when the store closes. It contains extracted clinical values, so the
folder should be on the site's own storage.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

_SCHEMA = """
CREATE TABLE resources (
    key TEXT PRIMARY KEY, type TEXT, patient_ref TEXT, source TEXT
) WITHOUT ROWID;
CREATE TABLE patients (
    key TEXT PRIMARY KEY, gender TEXT,
    birth_first INTEGER, birth_last INTEGER,
    deceased INTEGER, deceased_first INTEGER, deceased_last INTEGER
) WITHOUT ROWID;
CREATE TABLE alias (alias TEXT PRIMARY KEY, patient_key TEXT) WITHOUT ROWID;
CREATE TABLE rejected_alias (alias TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE facts (
    patient_ref TEXT, slot INTEGER, day INTEGER, second INTEGER,
    value REAL, resource TEXT
);
"""

# SQLite page cache in KiB (a negative cache_size counts KiB); sorting spills
# to temporary files beyond it. The cache is most of the memory that grows
# with the export, so it is kept small.
CACHE_KIB = 4 * 1024
_BATCH = 10_000


@dataclass(frozen=True)
class PatientRecord:
    """Demographics of one Patient, with dates as ranges of day ordinals."""

    key: str
    gender: str | None
    birth: tuple[int, int] | None
    deceased: bool
    deceased_on: tuple[int, int] | None


@dataclass(frozen=True)
class Fact:
    """One value for one slot of one patient: a feature, the label or follow-up."""

    slot: int
    day: int
    second: int
    value: float
    resource: str


class FactStore:
    """Spill of patients, aliases and facts, readable one patient at a time."""

    def __init__(self, work_dir: str | Path | None = None) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="prifed-fhir-",
                                             dir=str(work_dir) if work_dir else None))
        self._db = sqlite3.connect(self._folder / "spill.sqlite")
        self._db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; "
            f"PRAGMA temp_store=FILE; PRAGMA cache_size=-{CACHE_KIB};"
        )
        self._db.executescript(_SCHEMA)
        self._facts: list[tuple[str, int, int, int, float, str]] = []

    def claim_resource(self, key: str, resource_type: str,
                       patient_ref: str | None, source: str = "") -> bool:
        """Record a resource key; return False when the key was seen before.

        ``source`` is the input file and position, kept for the local log.
        """
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO resources VALUES (?, ?, ?, ?)",
            (key, resource_type, patient_ref, source),
        )
        return cursor.rowcount == 1

    def forget_reference(self, key: str) -> None:
        """Stop checking the patient of a resource that was rejected whole."""
        self._db.execute("UPDATE resources SET patient_ref = NULL WHERE key = ?",
                         (key,))

    def has_alias(self, alias: str) -> bool:
        """Tell whether a patient alias is already taken."""
        row = self._db.execute("SELECT 1 FROM alias WHERE alias = ?", (alias,))
        return row.fetchone() is not None

    def add_patient(self, record: PatientRecord, aliases: list[str]) -> None:
        """Store a patient and every reference form that points at it."""
        birth = record.birth or (None, None)
        died = record.deceased_on or (None, None)
        self._db.execute(
            "INSERT INTO patients VALUES (?, ?, ?, ?, ?, ?, ?)",
            (record.key, record.gender, birth[0], birth[1], int(record.deceased),
             died[0], died[1]),
        )
        self._db.executemany(
            "INSERT OR IGNORE INTO alias VALUES (?, ?)",
            [(alias, record.key) for alias in aliases],
        )

    def add_rejected_patient(self, aliases: list[str]) -> None:
        """Remember the reference forms of a rejected Patient."""
        self._db.executemany(
            "INSERT OR IGNORE INTO rejected_alias VALUES (?)",
            [(alias,) for alias in aliases],
        )

    def add_fact(self, patient_ref: str, fact: Fact) -> None:
        """Append one fact; facts are written in batches."""
        self._facts.append((patient_ref, fact.slot, fact.day, fact.second,
                            fact.value, fact.resource))
        if len(self._facts) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        """Write buffered facts and commit."""
        if self._facts:
            self._db.executemany("INSERT INTO facts VALUES (?, ?, ?, ?, ?, ?)",
                                 self._facts)
            self._facts.clear()
        self._db.commit()

    def unresolved(self) -> Iterator[tuple[str, str, bool, str]]:
        """Yield (type, key, patient rejected, source) for resources without patient."""
        self.flush()
        rows = self._db.execute(
            "SELECT r.type, r.key, ra.alias IS NOT NULL, r.source FROM resources r "
            "LEFT JOIN alias a ON a.alias = r.patient_ref "
            "LEFT JOIN rejected_alias ra ON ra.alias = r.patient_ref "
            "WHERE r.patient_ref IS NOT NULL AND a.alias IS NULL "
            "ORDER BY r.key"
        )
        for resource_type, key, rejected, source in rows:
            yield resource_type, key, bool(rejected), source

    def patients(self) -> Iterator[tuple[PatientRecord, list[Fact]]]:
        """Yield every patient in key order with its facts ordered by slot and time."""
        self.flush()
        patient_rows = self._db.execute("SELECT * FROM patients ORDER BY key")
        fact_rows = self._db.cursor().execute(
            "SELECT a.patient_key, f.slot, f.day, f.second, f.value, f.resource "
            "FROM facts f JOIN alias a ON a.alias = f.patient_ref "
            "ORDER BY a.patient_key, f.slot, f.day, f.second, f.resource"
        )
        pending = fact_rows.fetchone()
        for key, gender, b_first, b_last, deceased, d_first, d_last in patient_rows:
            record = PatientRecord(
                key=key,
                gender=gender,
                birth=(b_first, b_last) if b_first is not None else None,
                deceased=bool(deceased),
                deceased_on=(d_first, d_last) if d_first is not None else None,
            )
            facts: list[Fact] = []
            while pending is not None and pending[0] <= key:
                if pending[0] == key:
                    facts.append(Fact(*pending[1:]))
                pending = fact_rows.fetchone()
            yield record, facts

    def close(self) -> None:
        """Close the database and delete its folder."""
        self._db.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> FactStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

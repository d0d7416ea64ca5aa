"""The on-disk spill: grouping by patient and cleaning up."""

from __future__ import annotations

from pathlib import Path

from prifed.fhir.store import Fact, FactStore, PatientRecord


def test_groups_facts_by_patient(tmp_path: Path) -> None:
    with FactStore(tmp_path) as store:
        store.add_patient(PatientRecord("Patient/b", "male", None, False, None),
                          ["Patient/b", "urn:uuid:b"])
        store.add_patient(PatientRecord("Patient/a", "female", (1, 1), False, None),
                          ["Patient/a"])
        store.add_fact("urn:uuid:b", Fact(0, 10, -1, 2.0, "Observation/2"))
        store.add_fact("Patient/a", Fact(0, 12, -1, 3.0, "Observation/3"))
        store.add_fact("Patient/a", Fact(0, 11, -1, 1.0, "Observation/1"))
        store.add_fact("Patient/ghost", Fact(0, 11, -1, 9.0, "Observation/9"))
        grouped = [(record.key, [fact.value for fact in facts])
                   for record, facts in store.patients()]
        folder = next(tmp_path.iterdir())
    assert grouped == [("Patient/a", [1.0, 3.0]), ("Patient/b", [2.0])]
    assert not folder.exists()


def test_duplicate_and_unresolved(tmp_path: Path) -> None:
    with FactStore(tmp_path) as store:
        assert store.claim_resource("Observation/1", "Observation", "Patient/x",
                                    "a.ndjson line 1")
        assert not store.claim_resource("Observation/1", "Observation", "Patient/x",
                                        "a.ndjson line 9")
        store.claim_resource("Observation/2", "Observation", "Patient/y",
                             "b.json entry 2")
        store.add_rejected_patient(["Patient/y"])
        assert list(store.unresolved()) == [
            ("Observation", "Observation/1", False, "a.ndjson line 1"),
            ("Observation", "Observation/2", True, "b.json entry 2")]

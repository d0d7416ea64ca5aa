"""Reading bundles and NDJSON files, plain or gzip-compressed."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pytest

from fhir_cases import FIXTURES, day, make_spec, observation, patient
from prifed.errors import DataError
from prifed.fhir import load_site_table
from prifed.fhir import reader
from prifed.fhir.reader import discover, iter_items


def bundle(entries: list[dict], kind: str = "transaction",
           envelope_last: bool = False) -> str:
    wrapped = [{"fullUrl": f"urn:uuid:{i}", "resource": r}
               for i, r in enumerate(entries)]
    if envelope_last:
        return json.dumps({"entry": wrapped, "type": kind, "resourceType": "Bundle"})
    return json.dumps({"resourceType": "Bundle", "type": kind, "entry": wrapped})


def test_envelope_after_entries(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(bundle([patient("p1"), patient("p2")], envelope_last=True))
    items = list(iter_items(path, "b.json"))
    assert [item.data["id"] for item in items] == ["p1", "p2"]
    assert [item.full_url for item in items] == ["urn:uuid:0", "urn:uuid:1"]


def test_unsupported_bundle_type(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(bundle([patient("p1")], kind="history"))
    items = list(iter_items(path, "b.json"))
    assert [(item.data, item.error) for item in items] == [(None, "unsupported_bundle")]


def test_truncated_bundle_keeps_earlier_entries(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    text = bundle([patient("p1"), patient("p2")])
    path.write_text(text[: text.index('"p2"')])
    items = list(iter_items(path, "b.json"))
    assert items[0].data["id"] == "p1"
    assert items[-1].error == "invalid_json"
    assert items[-1].position == "after entry 1"


def test_single_resource_file(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(patient("p1")))
    items = list(iter_items(path, "p.json"))
    assert [item.data["id"] for item in items] == ["p1"]


def test_gzip_ndjson_and_bundle(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    with gzip.open(folder / "Observation.ndjson.gz", "wt") as handle:
        handle.write(json.dumps(observation("o1", "p1", "2345-7", 90.0, "mg/dL",
                                            day(-1))) + "\n")
    with gzip.open(folder / "patients.json.gz", "wt") as handle:
        handle.write(bundle([patient("p1")]))
    rows, report = load_site_table(folder, make_spec(), site="test")
    assert rows.loc[0, "glucose"] == 90.0
    assert report.files_read == 2


def test_bundle_reference_by_full_url(tmp_path: Path) -> None:
    # Transaction bundles carry no ids: references point at the entry fullUrl.
    subject = {"reference": "urn:uuid:0"}
    resources = [
        {k: v for k, v in patient("p1").items() if k != "id"},
        {**{k: v for k, v in observation("o1", "x", "2345-7", 90.0, "mg/dL",
                                         day(-1)).items() if k != "id"},
         "subject": subject},
    ]
    (tmp_path / "b.json").write_text(bundle(resources))
    rows, report = load_site_table(tmp_path, make_spec(), site="test")
    assert rows.loc[0, "glucose"] == 90.0
    assert report.rejections == []


def test_discover_skips_hidden_and_other_files(tmp_path: Path) -> None:
    (tmp_path / "a.ndjson").write_text("")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "b.ndjson").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.JSON").write_text("{}")
    files, ignored = discover(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a.ndjson",
                                                                   "sub/c.JSON"]
    assert ignored == 1


def test_discover_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        discover(tmp_path / "absent")
    with pytest.raises(DataError, match="no .json, .ndjson or .jsonl files"):
        discover(tmp_path)
    (tmp_path / "x.csv").write_text("")
    with pytest.raises(DataError, match="must end in"):
        discover(tmp_path / "x.csv")


def test_synthea_patients_ndjson() -> None:
    lines = gzip.decompress((FIXTURES / "synthea" / "Patient.ndjson.gz").read_bytes())
    raw = [json.loads(line) for line in lines.splitlines() if line.strip()]
    items = list(iter_items(FIXTURES / "synthea" / "Patient.ndjson.gz", "p"))
    assert len(items) == len(raw) == 25
    assert [item.data["id"] for item in items] == [r["id"] for r in raw]


def oversize_cases(tmp_path: Path) -> Path:
    small = json.dumps(patient("p1"))
    big = json.dumps(patient("p2", text={"status": "generated", "div": "A" * 500}))
    exact = json.dumps(patient("p3")).ljust(len(big) - 1)
    path = tmp_path / "Patient.ndjson"
    path.write_text(f"{small}\n{big}\n{exact}\n{big}", encoding="utf-8")
    return path


@pytest.mark.parametrize("chunk", [1, 7, 64, 1024 * 1024])
def test_oversize_ndjson_line_skipped(tmp_path: Path, chunk: int,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "_CHUNK", chunk)
    path = oversize_cases(tmp_path)
    limit = len(path.read_text().splitlines()[1]) - 1
    items = list(iter_items(path, "Patient.ndjson", max_bytes=limit))
    assert [(item.position, item.error, item.data and item.data["id"])
            for item in items] == [
        ("line 1", None, "p1"),
        ("line 2", "resource_too_large", None),
        ("line 3", None, "p3"),
        ("line 4", "resource_too_large", None),
    ]


def test_oversize_line_not_held_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "Observation.ndjson"
    with path.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(patient("p1")) + "\n")
        handle.write('{"resourceType":"Observation","note":[{"text":"')
        handle.write("A" * (32 * 1024 * 1024) + '"}]}\n')
        handle.write(json.dumps(patient("p2")) + "\n")
    tracemalloc.start()
    try:
        items = list(iter_items(path, "o", max_bytes=1024 * 1024))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [item.error for item in items] == [None, "resource_too_large", None]
    assert peak < 8 * 1024 * 1024


def test_oversize_json_file_and_bundle_entry(tmp_path: Path) -> None:
    note = {"text": {"status": "generated", "div": "A" * 300_000}}
    single = tmp_path / "single.json"
    single.write_text(json.dumps(patient("p1", **note)))
    assert [(item.position, item.error) for item in iter_items(
        single, "single.json", max_bytes=200_000)] == [("file", "resource_too_large")]

    path = tmp_path / "b.json"
    path.write_text(bundle([patient("p1"), patient("p2", **note), patient("p3")]))
    items = list(iter_items(path, "b.json", max_bytes=200_000))
    assert [(item.position, item.error) for item in items] == [
        ("entry 1", None), ("entry 2", "resource_too_large")]
    assert len(list(iter_items(path, "b.json", max_bytes=400_000))) == 3


def test_oversize_line_counted_as_rejection(tmp_path: Path) -> None:
    path = oversize_cases(tmp_path)
    limit = len(path.read_text().splitlines()[1]) - 1
    rows, report = load_site_table(path, make_spec(), site="n",
                                   max_resource_bytes=limit)
    assert len(rows) == 2
    assert [(r.resource_type, r.reason, r.element, r.count)
            for r in report.rejections] == [
        ("(undecoded)", "resource_too_large", "(root)", 2)]
    assert report.resources_read == {"(undecoded)": 2, "Patient": 2}

"""Stream FHIR resources out of transaction bundles and bulk-export NDJSON.

An input is a file or a folder searched recursively for ``*.json``,
``*.ndjson`` and ``*.jsonl`` files, each optionally gzip-compressed (``.gz``).
A ``.json`` file contains a Bundle or a single resource. A Bundle is read
entry by entry with ijson, so memory contains one entry at a time. An NDJSON
file contains one resource per line. Items come out as decoded JSON objects,
each with the place it came from. An item that cannot be decoded comes out as
an error, and reading goes on with the next line or file.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import ijson

from prifed.errors import DataError

BUNDLE_TYPES = frozenset({"transaction", "batch", "collection", "searchset",
                          "document"})
_NDJSON_SUFFIXES = (".ndjson", ".jsonl")
_JSON_SUFFIXES = (".json",)


@dataclass(frozen=True)
class RawItem:
    """One decoded JSON object from an input, or the reason it was not decoded."""

    data: dict[str, Any] | None
    source: str
    position: str
    full_url: str | None = None
    error: str | None = None


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(_NDJSON_SUFFIXES):
        return "ndjson"
    if name.endswith(_JSON_SUFFIXES):
        return "json"
    return None


def discover(path: str | Path) -> tuple[list[Path], int]:
    """Return the input files under a path, sorted, and how many were ignored."""
    root = Path(path)
    if root.is_file():
        if _kind(root) is None:
            raise DataError(
                f"input {root} must end in .json, .ndjson or .jsonl (optionally .gz)"
            )
        return [root], 0
    if not root.is_dir():
        raise DataError(f"input {root} not found; give a FHIR file or folder")

    files: list[Path] = []
    ignored = 0
    for candidate in sorted(root.rglob("*")):
        relative = candidate.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if not candidate.is_file():
            continue
        if _kind(candidate) is None:
            ignored += 1
        else:
            files.append(candidate)
    if not files:
        raise DataError(
            f"no .json, .ndjson or .jsonl files under {root}; give a FHIR export folder"
        )
    return files, ignored


def _open(path: Path) -> IO[bytes]:
    if path.name.lower().endswith(".gz"):
        return gzip.GzipFile(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


def iter_items(path: Path, label: str) -> Iterator[RawItem]:
    """Yield every item of one input file; ``label`` names it in the output."""
    if _kind(path) == "ndjson":
        yield from _iter_ndjson(path, label)
    else:
        yield from _iter_json(path, label)


def _iter_ndjson(path: Path, label: str) -> Iterator[RawItem]:
    number = 0
    try:
        with _open(path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                position = f"line {number}"
                try:
                    data = json.loads(line)
                except ValueError:
                    yield RawItem(None, label, position, error="invalid_json")
                    continue
                if not isinstance(data, dict):
                    yield RawItem(None, label, position, error="not_a_resource")
                    continue
                yield RawItem(data, label, position)
    except (OSError, EOFError):
        # A truncated or corrupt gzip stream ends the file, not the import.
        yield RawItem(None, label, f"after line {number}", error="invalid_json")


def _envelope(path: Path) -> tuple[object, object]:
    """Return the top-level resourceType and type, scanning no further than needed."""
    found: dict[str, object] = {}
    with _open(path) as handle:
        for prefix, event, value in ijson.parse(handle):
            if prefix in ("resourceType", "type") and event in ("string", "number"):
                found[prefix] = value
                if len(found) == 2:
                    break
    return found.get("resourceType"), found.get("type")


def _iter_json(path: Path, label: str) -> Iterator[RawItem]:
    try:
        resource_type, bundle_type = _envelope(path)
    except (ijson.JSONError, ValueError, OSError, EOFError):
        yield RawItem(None, label, "file", error="invalid_json")
        return

    if resource_type != "Bundle":
        yield from _iter_single(path, label)
        return
    if bundle_type not in BUNDLE_TYPES:
        yield RawItem(None, label, "file", error="unsupported_bundle")
        return

    number = 0
    try:
        with _open(path) as handle:
            for entry in ijson.items(handle, "entry.item", use_float=True):
                number += 1
                position = f"entry {number}"
                if not isinstance(entry, dict):
                    yield RawItem(None, label, position, error="not_a_resource")
                    continue
                resource = entry.get("resource")
                if resource is None:
                    continue
                full_url = entry.get("fullUrl")
                if not isinstance(resource, dict):
                    yield RawItem(None, label, position, error="not_a_resource")
                    continue
                yield RawItem(resource, label, position,
                              full_url if isinstance(full_url, str) else None)
    except (ijson.JSONError, ValueError, OSError, EOFError):
        yield RawItem(None, label, f"after entry {number}", error="invalid_json")


def _iter_single(path: Path, label: str) -> Iterator[RawItem]:
    try:
        with _open(path) as handle:
            data = json.load(handle)
    except (ValueError, OSError, EOFError):
        yield RawItem(None, label, "file", error="invalid_json")
        return
    if not isinstance(data, dict):
        yield RawItem(None, label, "file", error="not_a_resource")
        return
    yield RawItem(data, label, "file")

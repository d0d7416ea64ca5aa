"""Stream FHIR resources out of transaction bundles and bulk-export NDJSON.

An input is a file or a folder searched recursively for ``*.json``,
``*.ndjson`` and ``*.jsonl`` files, each optionally gzip-compressed (``.gz``).
A ``.json`` file contains a Bundle or a single resource. A Bundle is read
entry by entry with ijson, so memory contains one entry at a time. An NDJSON
file contains one resource per line. Items come out as decoded JSON objects,
each with the place it came from. An item that cannot be decoded comes out as
an error, and reading goes on with the next line or file.

No resource larger than ``max_bytes`` (default :data:`MAX_RESOURCE_BYTES`) is
held in memory. An NDJSON file is read in chunks, and a longer line is skipped
to its newline and comes out as a ``resource_too_large`` error. A single
resource file is read to at most that size. In a Bundle, the bytes ijson reads
between two entries are counted, and an entry over the limit ends the file.
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
# Largest NDJSON line, single resource file or Bundle entry read, in bytes.
MAX_RESOURCE_BYTES = 16 * 1024 * 1024
_CHUNK = 1024 * 1024


class _TooLarge(Exception):
    """Raised inside a Bundle read when one entry passes the size limit."""


class _CountingReader:
    """File wrapper that raises _TooLarge when too many bytes pass one mark."""

    def __init__(self, handle: IO[bytes], limit: int) -> None:
        self._handle = handle
        self._limit = limit
        self._since_mark = 0

    def mark(self) -> None:
        """Start counting again, as a new item begins."""
        self._since_mark = 0

    def read(self, size: int = -1) -> bytes:
        """Read like the wrapped file, counting the bytes."""
        data = self._handle.read(size)
        self._since_mark += len(data)
        if self._since_mark > self._limit:
            raise _TooLarge
        return data


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


def iter_items(path: Path, label: str,
               max_bytes: int = MAX_RESOURCE_BYTES) -> Iterator[RawItem]:
    """Yield every item of one input file; ``label`` names it in the output."""
    if _kind(path) == "ndjson":
        yield from _iter_ndjson(path, label, max_bytes)
    else:
        yield from _iter_json(path, label, max_bytes)


def _lines(handle: IO[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number, line) in chunks; a line over ``max_bytes`` gives None.

    The part of an oversize line already read is dropped, and the rest is
    read and discarded up to its newline, so memory stays near
    ``max_bytes`` plus one chunk.
    """
    number = 0
    line = bytearray()
    oversize = False
    while chunk := handle.read(_CHUNK):
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            number += 1
            if not oversize:
                line += chunk[start:end]
                oversize = len(line) > max_bytes
            yield number, None if oversize else bytes(line)
            line.clear()
            oversize = False
            start = end + 1
        if not oversize:
            line += chunk[start:]
            if len(line) > max_bytes:
                oversize = True
                line.clear()
    if line or oversize:
        yield number + 1, None if oversize else bytes(line)


def _iter_ndjson(path: Path, label: str, max_bytes: int) -> Iterator[RawItem]:
    number = 0
    try:
        with _open(path) as handle:
            for number, line in _lines(handle, max_bytes):
                position = f"line {number}"
                if line is None:
                    yield RawItem(None, label, position, error="resource_too_large")
                    continue
                if not line.strip():
                    continue
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


def _envelope(path: Path, max_bytes: int) -> tuple[object, object]:
    """Return the top-level resourceType and type, scanning no further than needed."""
    found: dict[str, object] = {}
    with _open(path) as handle:
        for prefix, event, value in ijson.parse(_CountingReader(handle, max_bytes)):
            if prefix in ("resourceType", "type") and event in ("string", "number"):
                found[prefix] = value
                if len(found) == 2:
                    break
    return found.get("resourceType"), found.get("type")


def _iter_json(path: Path, label: str, max_bytes: int) -> Iterator[RawItem]:
    try:
        resource_type, bundle_type = _envelope(path, max_bytes)
    except _TooLarge:
        yield RawItem(None, label, "file", error="resource_too_large")
        return
    except (ijson.JSONError, ValueError, OSError, EOFError):
        yield RawItem(None, label, "file", error="invalid_json")
        return

    if resource_type != "Bundle":
        yield from _iter_single(path, label, max_bytes)
        return
    if bundle_type not in BUNDLE_TYPES:
        yield RawItem(None, label, "file", error="unsupported_bundle")
        return

    number = 0
    try:
        with _open(path) as handle:
            counted = _CountingReader(handle, max_bytes)
            for entry in ijson.items(counted, "entry.item", use_float=True):
                counted.mark()
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
    except _TooLarge:
        yield RawItem(None, label, f"entry {number + 1}", error="resource_too_large")
    except (ijson.JSONError, ValueError, OSError, EOFError):
        yield RawItem(None, label, f"after entry {number}", error="invalid_json")


def _iter_single(path: Path, label: str, max_bytes: int) -> Iterator[RawItem]:
    try:
        with _open(path) as handle:
            text = handle.read(max_bytes + 1)
        if len(text) > max_bytes:
            yield RawItem(None, label, "file", error="resource_too_large")
            return
        data = json.loads(text)
    except (ValueError, OSError, EOFError):
        yield RawItem(None, label, "file", error="invalid_json")
        return
    if not isinstance(data, dict):
        yield RawItem(None, label, "file", error="not_a_resource")
        return
    yield RawItem(data, label, "file")

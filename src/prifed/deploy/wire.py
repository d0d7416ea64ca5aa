"""Payloads between site and coordinator: compressed safetensors and JSON.

Tensors travel as safetensors inside one zstandard frame that declares its
content size and carries a checksum. Nothing is unpickled. JSON bodies are
checked against pydantic models before anything reads them, and NaN travels
as ``null`` because JSON has no NaN.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import zstandard
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from prifed.core.params import ALLOWED_DTYPES, ParameterSet, c_contiguous
from prifed.deploy.errors import RequestRejected

UPDATE_FORMAT = "prifed-update-1"
MODEL_FORMAT = "prifed-model-1"
EXTRA_PREFIX = "extra/"
COMPRESSION_LEVEL = 3
_UNKNOWN_SIZE = {zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR}


def compress(data: bytes) -> bytes:
    """Compress bytes into one zstandard frame with its size and a checksum."""
    compressor = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL, write_checksum=True,
                                          write_content_size=True)
    return compressor.compress(data)


def decompress(data: bytes, limit: int, subject: str = "payload") -> bytes:
    """Decompress one zstandard frame, refusing bombs, truncation and trailing bytes.

    The frame must declare its content size, which must not exceed ``limit``.
    Raises :class:`RequestRejected` (400 or 413) naming the problem.
    """
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise RequestRejected(400, "malformed_payload",
                              f"{subject} is not a zstandard frame") from None
    if size < 0 or size in _UNKNOWN_SIZE:
        raise RequestRejected(400, "malformed_payload",
                              f"{subject}'s zstandard frame must declare its content "
                              "size")
    if size > limit:
        raise RequestRejected(413, "too_large",
                              f"{subject} decompresses to {size} bytes; the limit is "
                              f"{limit}")
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    try:
        output = decompressor.decompress(data)
    except zstandard.ZstdError as error:
        raise RequestRejected(400, "malformed_payload",
                              f"{subject} is corrupt: {error}") from None
    if not decompressor.eof:
        raise RequestRejected(400, "truncated_payload",
                              f"{subject} is truncated: its zstandard frame ends early "
                              f"({len(output)} of {size} bytes decompressed)")
    if decompressor.unused_data:
        raise RequestRejected(400, "malformed_payload",
                              f"{subject} has {len(decompressor.unused_data)} bytes "
                              "after its zstandard frame")
    if len(output) != size:
        raise RequestRejected(400, "malformed_payload",
                              f"{subject} decompressed to {len(output)} bytes; its "
                              f"frame declared {size}")
    return output


def encode_tensors(tensors: Mapping[str, np.ndarray],
                   metadata: Mapping[str, str]) -> bytes:
    """Serialise tensors to safetensors with metadata, then compress."""
    return compress(bytes(st_save(c_contiguous(tensors), metadata=dict(metadata))))


def decode_tensors(data: bytes, limit: int, subject: str
                   ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Decompress and parse safetensors; return tensors and metadata (400 if bad)."""
    raw = decompress(data, limit, subject)
    try:
        tensors = st_load(raw)
    except (SafetensorError, ValueError, TypeError) as error:
        raise RequestRejected(400, "malformed_payload",
                              f"{subject} is not valid safetensors: {error}") from None
    (header_size,) = struct.unpack_from("<Q", raw, 0)
    header = json.loads(raw[8:8 + header_size])
    metadata = header.get("__metadata__") or {}
    for name, value in tensors.items():
        if value.dtype not in ALLOWED_DTYPES:
            raise RequestRejected(422, "update_rejected",
                                  f"tensor {name!r} has dtype {value.dtype}, which "
                                  "PriFed does not accept")
    return dict(tensors), {str(k): str(v) for k, v in metadata.items()}


def encode_update(params: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray],
                  site: str, server_round: int,
                  labels: Mapping[str, str] | None = None) -> bytes:
    """Serialise a site's reply: model tensors, then extra tensors under ``extra/``.

    ``labels`` are added to the metadata, such as the FHIR spec hash.
    """
    tensors: dict[str, np.ndarray] = dict(params)
    for name, value in extra.items():
        tensors[EXTRA_PREFIX + name] = value
    metadata = {**(labels or {}), "format": UPDATE_FORMAT, "site": site,
                "round": str(server_round)}
    return encode_tensors(tensors, metadata)


def split_update(tensors: Mapping[str, np.ndarray], order: list[str]
                 ) -> tuple[ParameterSet, ParameterSet]:
    """Split parsed update tensors into model tensors (in ``order``) and extras."""
    extra = {name[len(EXTRA_PREFIX):]: value for name, value in tensors.items()
             if name.startswith(EXTRA_PREFIX)}
    params = {name: tensors[name] for name in order if name in tensors}
    params |= {name: value for name, value in tensors.items()
               if name not in params and not name.startswith(EXTRA_PREFIX)}
    return params, extra


def check_finite_extra(site: str, extra: Mapping[str, np.ndarray]) -> None:
    """Reject NaN or infinite values in a reply's extra tensors (422)."""
    for name, value in extra.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise RequestRejected(422, "update_rejected",
                                  f"extra tensor {name!r} from site {site!r} contains "
                                  "NaN or infinite values")


def to_json(value: Any) -> Any:
    """Return a JSON-safe copy: NaN and infinities become None, numpy scalars plain."""
    if isinstance(value, dict):
        return {str(key): to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value: Any) -> bytes:
    """Serialise to compact JSON bytes, NaN as null."""
    return json.dumps(to_json(value), separators=(",", ":"), allow_nan=False).encode()


def metrics_from_json(values: Mapping[str, float | None]) -> dict[str, float]:
    """Turn JSON metrics back into floats, null as NaN."""
    return {name: math.nan if value is None else float(value)
            for name, value in values.items()}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JoinBody(_Body):
    """A site's first request: its name, its join token and its public key."""

    site: str = Field(min_length=1, max_length=100)
    token: str = Field(min_length=8, max_length=200)
    public_key: str = Field(min_length=40, max_length=60)


class UploadBody(_Body):
    """The start of an upload: size and digest of the compressed update, and counts."""

    size: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    num_samples: int = Field(ge=0)
    metrics: dict[str, float | None] = Field(default_factory=dict, max_length=64)


class FailureBody(_Body):
    """A site's report that it cannot train this round, and why."""

    reason: str = Field(min_length=1, max_length=500)


class EvaluationBody(_Body):
    """A site's metrics of the global model on its test rows."""

    num_samples: int = Field(ge=0)
    metrics: dict[str, float | None] = Field(max_length=64)


def parse_body(model: type[_Body], data: bytes, subject: str) -> Any:
    """Parse and validate a JSON body; raise 400 or 422 naming the field."""
    try:
        return model.model_validate_json(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        status = 400 if first["type"] in {"json_invalid", "json_type"} else 422
        raise RequestRejected(status, "invalid_body",
                              f"{subject}: field {where!r}: {first['msg']}") from None


def state_to_parts(state: Mapping[str, Any]) -> tuple[dict[str, Any],
                                                     dict[str, np.ndarray]]:
    """Split a strategy's state into JSON values and arrays referenced by key.

    Arrays anywhere in nested dicts and lists become ``{"$array": key}``, so
    the state can be saved as JSON plus one safetensors file, never pickled.
    """
    arrays: dict[str, np.ndarray] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, np.ndarray):
            arrays[path] = value
            return {"$array": path}
        if isinstance(value, Mapping):
            return {str(k): walk(v, f"{path}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, np.generic):
            return value.item()
        return value

    return walk(dict(state), "state"), arrays


def state_from_parts(values: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    """Rebuild a state written by :func:`state_to_parts`."""
    if isinstance(values, dict):
        if set(values) == {"$array"}:
            return np.array(arrays[values["$array"]], copy=True)
        return {k: state_from_parts(v, arrays) for k, v in values.items()}
    if isinstance(values, list):
        return [state_from_parts(v, arrays) for v in values]
    return values

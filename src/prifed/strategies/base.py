"""Shared pieces of the strategies: which tensors a server step moves, and state files.

A server step (a server learning rate, Adam moments, a staleness-weighted
buffer) moves only the trainable float tensors that
:meth:`prifed.core.strategy.Strategy.initialize` named. Every other tensor
(batch-norm running means and variances, integer counters) takes the
sample-weighted mean of the replies, exactly as in FedAvg.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from prifed.core.aggregate import cast_like
from prifed.core.params import ParameterSet, copy_params, is_float
from prifed.errors import ConfigError, UpdateRejected

_STATE_FORMAT = "prifed-state-1"

# Names shared by the coordinator and the sites: instruction config keys and
# the prefixes of tensors in TrainInstruction.extra and TrainReply.extra.
PROXIMAL_MU_KEY = "proximal_mu"
SCAFFOLD_KEY = "scaffold"
CONTROL_PREFIX = "control/"
CONTROL_DELTA_PREFIX = "control_delta/"


def stepped_names(params: Mapping[str, np.ndarray],
                  trainable: Iterable[str]) -> list[str]:
    """List the tensors a server step moves: trainable and floating point."""
    names = frozenset(trainable)
    return [name for name, value in params.items()
            if name in names and is_float(value)]


def apply_server_step(params: Mapping[str, np.ndarray],
                      mean: Mapping[str, np.ndarray],
                      steps: Mapping[str, np.ndarray]) -> ParameterSet:
    """Return ``mean`` with each stepped tensor replaced by ``params + step``.

    ``steps`` contains float64 increments for the stepped tensors only; every
    other tensor keeps the weighted mean of the replies. Results are cast
    back to the global model's dtypes.
    """
    result = copy_params(mean)
    for name, step in steps.items():
        moved = params[name].astype(np.float64) + step
        result[name] = cast_like(moved, params[name].dtype)
    return result


def require_positive(field: str, value: float) -> float:
    """Return ``value`` as a float, raising ConfigError unless it is above 0."""
    number = float(value)
    if not number > 0:
        raise ConfigError(f"{field} must be positive; got {value!r}")
    return number


def require_fraction(field: str, value: float, closed_low: bool = True) -> float:
    """Return ``value`` as a float, raising ConfigError unless it is in [0, 1)."""
    number = float(value)
    low_ok = number >= 0 if closed_low else number > 0
    if not (low_ok and number < 1):
        raise ConfigError(f"{field} must be in [0, 1); got {value!r}")
    return number


def check_extra_tensors(site: str, extra: Mapping[str, np.ndarray],
                        expected: Mapping[str, np.ndarray]) -> None:
    """Check that ``extra`` has exactly the expected names, shapes and dtypes."""
    missing = [name for name in expected if name not in extra]
    if missing:
        raise UpdateRejected(site, "missing extra tensor", missing[0])
    unexpected = [name for name in extra if name not in expected]
    if unexpected:
        raise UpdateRejected(site, "unexpected extra tensor", unexpected[0])
    for name, reference in expected.items():
        value = extra[name]
        if not isinstance(value, np.ndarray):
            raise UpdateRejected(site, "expected a numpy array, got "
                                 f"{type(value).__name__}", name)
        if value.shape != reference.shape:
            raise UpdateRejected(site, f"shape must be {reference.shape}; got "
                                 f"{value.shape}", name)
        if value.dtype != reference.dtype:
            raise UpdateRejected(site, f"dtype must be {reference.dtype}; got "
                                 f"{value.dtype}", name)
        if not np.isfinite(value).all():
            raise UpdateRejected(site, "contains NaN or infinite values", name)


def state_to_bytes(state: Mapping[str, Any]) -> bytes:
    """Serialise a state dict (a strategy's or a site's) to safetensors, never pickle.

    Arrays, at any depth of nested dicts, become tensors; every other value
    must be a JSON value and travels in the file's metadata.
    """
    tensors: dict[str, np.ndarray] = {}
    paths: list[list[str]] = []
    skeleton = _split_arrays(state, [], tensors, paths)
    metadata = {"format": _STATE_FORMAT,
                "skeleton": json.dumps(skeleton, allow_nan=False),
                "paths": json.dumps(paths)}
    return bytes(_st_save(tensors, metadata=metadata))


def state_from_bytes(data: bytes) -> dict[str, Any]:
    """Parse bytes written by :func:`state_to_bytes` back into a state dict."""
    metadata = _read_metadata(data)
    if metadata.get("format") != _STATE_FORMAT:
        raise ConfigError(f"state format must be {_STATE_FORMAT!r}; got "
                          f"{metadata.get('format')!r}")
    tensors = _st_load(data)
    state = json.loads(metadata["skeleton"])
    for index, path in enumerate(json.loads(metadata["paths"])):
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = tensors[f"t{index}"]
    return state


def _read_metadata(data: bytes) -> dict[str, str]:
    # A safetensors file opens with the header length (u64, little endian)
    # and a JSON header whose "__metadata__" entry contains the string metadata.
    if len(data) < 8:
        raise ConfigError(f"state is {len(data)} bytes; too short for "
                          "a safetensors file")
    length = struct.unpack("<Q", data[:8])[0]
    try:
        header = json.loads(data[8:8 + length])
    except ValueError as error:
        raise ConfigError(f"state header is malformed: {error}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _split_arrays(value: Any, path: list[str], tensors: dict[str, np.ndarray],
                  paths: list[list[str]]) -> Any:
    if isinstance(value, np.ndarray):
        # np.ascontiguousarray would turn a 0-d counter into shape (1,).
        tensors[f"t{len(paths)}"] = np.array(value, order="C", copy=True)
        paths.append(list(path))
        return None
    if isinstance(value, Mapping):
        skeleton = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"state keys must be strings; got {key!r}")
            skeleton[key] = _split_arrays(item, path + [key], tensors, paths)
        return skeleton
    if isinstance(value, (list, tuple)):
        if any(isinstance(item, (np.ndarray, Mapping)) for item in value):
            raise TypeError("state lists must hold JSON values only")
        return list(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"state values must be JSON values or arrays; got "
                    f"{type(value).__name__}")

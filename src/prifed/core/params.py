"""Named parameter sets: the model state that travels between coordinator and sites."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from prifed.errors import UpdateRejected

ParameterSet = dict[str, np.ndarray]
"""Tensor name to array, in model order (float and integer tensors)."""

ALLOWED_DTYPES = frozenset(
    np.dtype(t) for t in ("float16", "float32", "float64", "int8", "int16",
                          "int32", "int64", "uint8", "bool")
)


def is_float(array: np.ndarray) -> bool:
    """Tell whether a tensor holds floating-point values."""
    return bool(np.issubdtype(array.dtype, np.floating))


def copy_params(params: Mapping[str, np.ndarray]) -> ParameterSet:
    """Return a deep copy that keeps names, order and dtypes."""
    return {name: np.array(value, copy=True) for name, value in params.items()}


def num_values(params: Mapping[str, np.ndarray]) -> int:
    """Count the scalar values in a parameter set."""
    return int(sum(value.size for value in params.values()))


def params_to_bytes(params: Mapping[str, np.ndarray],
                    metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a parameter set to safetensors bytes (never pickle)."""
    return bytes(_st_save(c_contiguous(params), metadata=metadata))


def c_contiguous(params: Mapping[str, np.ndarray]) -> ParameterSet:
    """Return the tensors in C order, copying only those that are not, shapes kept."""
    # np.ascontiguousarray would turn a 0-d tensor (a batch-norm counter) into
    # shape (1,), so it is not used here.
    return {k: np.asarray(v) if np.asarray(v).flags.c_contiguous
            else np.array(v, order="C") for k, v in params.items()}


def params_from_bytes(data: bytes, order: list[str] | None = None) -> ParameterSet:
    """Parse safetensors bytes into a parameter set, in ``order`` when given."""
    loaded = _st_load(data)
    if order is None:
        return dict(loaded)
    return {name: loaded[name] for name in order if name in loaded} | {
        name: value for name, value in loaded.items() if name not in order
    }


def validate_update(site: str, reference: Mapping[str, np.ndarray],
                    update: Mapping[str, np.ndarray]) -> None:
    """Check that an update matches the global model tensor by tensor.

    Raises :class:`UpdateRejected` naming the site and the tensor for a
    missing or extra tensor, a shape or dtype mismatch, or a NaN or infinity.
    """
    missing = [name for name in reference if name not in update]
    if missing:
        raise UpdateRejected(site, "missing tensor", missing[0])
    extra = [name for name in update if name not in reference]
    if extra:
        raise UpdateRejected(site, "unexpected tensor", extra[0])
    for name, expected in reference.items():
        value = update[name]
        if not isinstance(value, np.ndarray):
            raise UpdateRejected(site, f"expected a numpy array, got "
                                 f"{type(value).__name__}", name)
        if value.shape != expected.shape:
            raise UpdateRejected(
                site, f"shape must be {expected.shape}; got {value.shape}", name)
        if value.dtype != expected.dtype:
            raise UpdateRejected(
                site, f"dtype must be {expected.dtype}; got {value.dtype}", name)
        if is_float(value) and not np.isfinite(value).all():
            raise UpdateRejected(site, "contains NaN or infinite values", name)


def subtract(left: Mapping[str, np.ndarray],
             right: Mapping[str, np.ndarray]) -> ParameterSet:
    """Return ``left - right`` for float tensors, in float64 for precision."""
    return {name: left[name].astype(np.float64) - right[name].astype(np.float64)
            for name in left if is_float(left[name])}

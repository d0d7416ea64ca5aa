"""Key management: the federation's CKKS context, its two exports and rotation.

One context is created per run. Its secret key decrypts every aggregate, so:

- the *site context* (with the secret key) goes to each site and nowhere
  else, by a channel the consortium trusts;
- the *coordinator context* (no secret key, no public key) lets the
  coordinator parse and add ciphertexts and nothing more: it can neither
  encrypt nor decrypt;
- rotating creates a new secret key and key id for a new run, with the same
  parameters unless new ones are given.

Sites encrypt with the secret key (symmetric RLWE encryption), which has about
a tenth of the noise of public-key encryption and keeps the public key out of
the coordinator's hands.

A context file is a safetensors file: one uint8 tensor holding TenSEAL's own
serialisation of the context, and string metadata (format, kind, key id,
parameters as JSON, run label, creation time). Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import tenseal as ts
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from prifed.errors import ConfigError
from prifed.he.params import CKKSParams, check_params
from prifed.log import get_logger

logger = get_logger(__name__)

FORMAT = "prifed-ckks-context"
FORMAT_VERSION = "1"
SITE_KIND = "site"
COORDINATOR_KIND = "coordinator"
_TENSOR = "tenseal_context"


@dataclass(frozen=True)
class FederationKey:
    """A loaded CKKS context with the parameters and identity of its key.

    ``key_id`` is a random 128-bit hex label made when the key is created. It
    travels with every ciphertext, so a ciphertext made under another key
    (an earlier run's context) is rejected by name before it is added.
    """

    context: ts.Context
    params: CKKSParams
    key_id: str
    run: str = ""
    created: str = ""
    previous_key_id: str = ""

    @property
    def has_secret_key(self) -> bool:
        return bool(self.context.is_private())

    @property
    def kind(self) -> str:
        return SITE_KIND if self.has_secret_key else COORDINATOR_KIND


def create_federation_key(params: CKKSParams, run: str = "") -> FederationKey:
    """Create a fresh CKKS context and secret key for one run."""
    check_params(params)
    context = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                         encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    context.global_scale = params.scale
    key = FederationKey(context, params, secrets.token_hex(16), run,
                        datetime.now(UTC).isoformat(timespec="seconds"))
    logger.info("keygen: key %s, degree %d, primes %s, scale 2^%d, %d sites",
                key.key_id, params.poly_modulus_degree,
                list(params.coeff_mod_bit_sizes), params.scale_bits,
                params.num_sites)
    return key


def rotate_key(key: FederationKey, run: str = "",
               params: CKKSParams | None = None) -> FederationKey:
    """Create a new secret key for a new run, recording the one it replaces."""
    fresh = create_federation_key(params or key.params, run or key.run)
    logger.info("rotate: key %s replaces key %s", fresh.key_id, key.key_id)
    return replace(fresh, previous_key_id=key.key_id)


def coordinator_key(key: FederationKey) -> FederationKey:
    """Return the same key without its secret part, as the coordinator loads it."""
    return load_key(coordinator_context_bytes(key))


def site_context_bytes(key: FederationKey) -> bytes:
    """Serialise the context with its secret key, for the sites only."""
    if not key.has_secret_key:
        raise ConfigError(f"key {key.key_id} has no secret key, so no site context "
                          "can be exported from it; export from the file that "
                          "`prifed he keygen` wrote for the sites")
    data = key.context.serialize(save_public_key=False, save_secret_key=True,
                                 save_galois_keys=False, save_relin_keys=False)
    return _pack(key, data, SITE_KIND)


def coordinator_context_bytes(key: FederationKey) -> bytes:
    """Serialise the context without secret or public key, for the coordinator."""
    data = key.context.serialize(save_public_key=False, save_secret_key=False,
                                 save_galois_keys=False, save_relin_keys=False)
    return _pack(key, data, COORDINATOR_KIND)


def _pack(key: FederationKey, data: bytes, kind: str) -> bytes:
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind,
                "key_id": key.key_id, "params": json.dumps(key.params.to_dict()),
                "run": key.run, "created": key.created,
                "previous_key_id": key.previous_key_id}
    tensor = np.frombuffer(data, dtype=np.uint8)
    return bytes(st_save({_TENSOR: tensor}, metadata=metadata))


def load_key(data: bytes, source: str = "context") -> FederationKey:
    """Parse a context file's bytes and check them against their metadata."""
    try:
        metadata = _read_metadata(data)
        tensors = st_load(data)
        params_dict = json.loads(metadata.get("params", "{}"))
    except (SafetensorError, ValueError) as error:
        raise ConfigError(f"{source} is not a PriFed CKKS context file: "
                          f"{error}") from None
    if metadata.get("format") != FORMAT or _TENSOR not in tensors:
        raise ConfigError(f"{source} is not a PriFed CKKS context file; format is "
                          f"{metadata.get('format')!r}, expected {FORMAT!r}")
    if metadata.get("version") != FORMAT_VERSION:
        raise ConfigError(f"{source} has context format version "
                          f"{metadata.get('version')!r}; this PriFed reads "
                          f"{FORMAT_VERSION!r}")
    params = CKKSParams.from_dict(params_dict)
    try:
        context = ts.context_from(tensors[_TENSOR].tobytes())
    except (ValueError, RuntimeError) as error:
        raise ConfigError(f"{source}: TenSEAL cannot parse the context: "
                          f"{error}") from None
    key = FederationKey(context, params, metadata.get("key_id", ""),
                        metadata.get("run", ""), metadata.get("created", ""),
                        metadata.get("previous_key_id", ""))
    _check_context(key, metadata.get("kind", ""), source)
    return key


def _read_metadata(data: bytes) -> dict[str, str]:
    """Read a safetensors header's metadata without loading the tensors."""
    if len(data) < 8:
        raise ValueError(f"file has {len(data)} bytes, too short for a header")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise ValueError("header length exceeds the file")
    header = json.loads(data[8:8 + length])
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    if not isinstance(metadata, dict):
        raise ValueError("header metadata is not an object")
    return {str(k): str(v) for k, v in metadata.items()}


def _check_context(key: FederationKey, kind: str, source: str) -> None:
    """Check that the TenSEAL context matches the parameters it is filed with."""
    seal = key.context.seal_context().data
    degree = seal.key_context_data().parms().poly_modulus_degree()
    total = seal.key_context_data().total_coeff_modulus_bit_count()
    data_bits = seal.first_context_data().total_coeff_modulus_bit_count()
    params = key.params
    expected = (params.poly_modulus_degree, sum(params.coeff_mod_bit_sizes),
                params.data_bits, params.scale)
    found = (degree, total, data_bits, key.context.global_scale)
    if found != expected:
        raise ConfigError(f"{source}: context has degree, modulus bits, data bits "
                          f"and scale {found}, but its metadata says {expected}")
    if len(key.key_id) != 32 or not set(key.key_id) <= set("0123456789abcdef"):
        raise ConfigError(f"{source}: key_id must be 32 hex characters; got "
                          f"{key.key_id!r}")
    if kind != key.kind:
        raise ConfigError(f"{source} is filed as a {kind!r} context but "
                          f"{'contains' if key.has_secret_key else 'lacks'} the secret "
                          "key; regenerate both files with `prifed he keygen`")


def write_key_file(path: Path, data: bytes) -> None:
    """Write a context file; a site context is readable by its owner only."""
    secret = _read_metadata(data).get("kind") == SITE_KIND
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if secret else 0o644
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


def read_key_file(path: Path) -> FederationKey:
    """Load a context file written by :func:`write_key_file`."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"failed to read CKKS context {path}: {error}") from None
    return load_key(data, source=str(path))

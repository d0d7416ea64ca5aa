"""Ed25519 request signatures with replay protection, shared by site and coordinator.

Every request from a site carries five headers. The signature covers the
federation name, the method, the raw path with its query, the site, a
timestamp in milliseconds, a random nonce and the SHA-256 of the body:

    prifed-sig-1\\n{federation}\\n{METHOD}\\n{path?query}\\n{site}\\n{ms}\\n{nonce}\\n{sha256}

The coordinator rejects a timestamp outside its clock-skew window and a nonce
it has already seen from that site, so a captured request cannot be sent
again, and a request for one federation cannot be replayed to another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from prifed.deploy.errors import RequestRejected

SCHEME = "prifed-sig-1"
SITE = "X-PriFed-Site"
TIMESTAMP = "X-PriFed-Timestamp"
NONCE = "X-PriFed-Nonce"
DIGEST = "X-PriFed-Content-SHA256"
SIGNATURE = "X-PriFed-Signature"
SIGNED_HEADERS = (SITE, TIMESTAMP, NONCE, DIGEST, SIGNATURE)
EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()

_NONCE = re.compile(r"^[0-9a-f]{32}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class SignedRequest:
    """The authentication headers of one request, parsed but not yet verified."""

    site: str
    timestamp_ms: int
    nonce: str
    digest: str
    signature: bytes


def canonical_request(federation: str, method: str, target: str, site: str,
                      timestamp_ms: int, nonce: str, digest: str) -> bytes:
    """Return the bytes a site signs for one request."""
    return "\n".join([SCHEME, federation, method.upper(), target, site,
                      str(timestamp_ms), nonce, digest]).encode()


def sign_request(key: ed25519.Ed25519PrivateKey, federation: str, site: str,
                 method: str, target: str, body_digest: str) -> dict[str, str]:
    """Return the authentication headers for one request."""
    timestamp_ms = int(time.time() * 1000)
    nonce = secrets.token_hex(16)
    message = canonical_request(federation, method, target, site, timestamp_ms,
                                nonce, body_digest)
    return {SITE: quote(site, safe=""), TIMESTAMP: str(timestamp_ms), NONCE: nonce,
            DIGEST: body_digest,
            SIGNATURE: base64.b64encode(key.sign(message)).decode()}


def parse_signed_headers(headers: Mapping[str, str]) -> SignedRequest:
    """Parse the authentication headers; raise 401 naming the first bad one."""
    for name in SIGNED_HEADERS:
        if not headers.get(name):
            raise RequestRejected(401, "unauthenticated",
                                  f"missing header {name}; every request must be "
                                  "signed with the site's Ed25519 key")
    site = unquote(headers[SITE])
    try:
        timestamp_ms = int(headers[TIMESTAMP])
    except ValueError:
        raise RequestRejected(401, "unauthenticated",
                              f"header {TIMESTAMP} must be an integer of "
                              "milliseconds") from None
    nonce = headers[NONCE]
    if not _NONCE.match(nonce):
        raise RequestRejected(401, "unauthenticated",
                              f"header {NONCE} must be 32 lowercase hex digits")
    digest = headers[DIGEST]
    if not _DIGEST.match(digest):
        raise RequestRejected(401, "unauthenticated",
                              f"header {DIGEST} must be 64 lowercase hex digits")
    try:
        signature = base64.b64decode(headers[SIGNATURE], validate=True)
    except (binascii.Error, ValueError):
        raise RequestRejected(401, "unauthenticated",
                              f"header {SIGNATURE} is not valid base64") from None
    return SignedRequest(site, timestamp_ms, nonce, digest, signature)


def check_timestamp(signed: SignedRequest, skew_seconds: float,
                    now: float | None = None) -> None:
    """Reject a timestamp outside the clock-skew window (401)."""
    now = time.time() if now is None else now
    offset = signed.timestamp_ms / 1000 - now
    if abs(offset) > skew_seconds:
        raise RequestRejected(401, "stale_request",
                              f"request timestamp is {offset:+.0f} s from the "
                              f"coordinator's clock; at most {skew_seconds:.0f} s "
                              "is allowed (check the site's clock, or the request "
                              "is a replay)")


def verify_signature(public_key: bytes, federation: str, method: str, target: str,
                     signed: SignedRequest) -> None:
    """Check the signature against a site's registered public key (401 if wrong)."""
    message = canonical_request(federation, method, target, signed.site,
                                signed.timestamp_ms, signed.nonce, signed.digest)
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(
            signed.signature, message)
    except (InvalidSignature, ValueError):
        raise RequestRejected(401, "bad_signature",
                              f"signature does not verify with the key registered "
                              f"for site {signed.site!r}") from None


def sha256_hex(data: bytes) -> str:
    """Return the SHA-256 of ``data`` as lowercase hex."""
    return hashlib.sha256(data).hexdigest()

"""The federation's keys: its CA, the coordinator's TLS certificate, site keys, tokens.

The CA (ECDSA P-256) signs the coordinator's TLS certificate; sites pin the
CA certificate, so they talk to the right coordinator even on a network they
do not trust. Sites prove who they are with Ed25519 keys that they generate
themselves; the private key never leaves the site. A join token binds a site
name to the first key that presents it, once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from prifed.errors import ConfigError

CA_KEY = "ca.key"
CA_CERT = "ca.pem"
SERVER_KEY = "coordinator.key"
SERVER_CERT = "coordinator.pem"
TOKEN_PREFIX = "pfj_"


@dataclass(frozen=True)
class PkiPaths:
    """The files of a federation's PKI folder."""

    folder: Path

    @property
    def ca_key(self) -> Path:
        return self.folder / CA_KEY

    @property
    def ca_cert(self) -> Path:
        return self.folder / CA_CERT

    @property
    def server_key(self) -> Path:
        return self.folder / SERVER_KEY

    @property
    def server_cert(self) -> Path:
        return self.folder / SERVER_CERT


def init_pki(folder: Path, federation: str, hostnames: list[str], ips: list[str],
             days: int = 825, force: bool = False) -> PkiPaths:
    """Create the federation CA and the coordinator's TLS key and certificate.

    ``hostnames`` and ``ips`` go into the certificate's subject alternative
    names; sites must reach the coordinator under one of them.
    """
    paths = PkiPaths(folder)
    existing = [p for p in (paths.ca_key, paths.ca_cert, paths.server_key,
                            paths.server_cert) if p.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} already exists; pass --force to replace "
                          "the federation's CA (every site must then get the new "
                          "ca.pem)")
    if not hostnames and not ips:
        raise ConfigError("the coordinator certificate needs at least one hostname "
                          "or IP address")
    addresses = []
    for ip in ips:
        try:
            addresses.append(ipaddress.ip_address(ip))
        except ValueError:
            raise ConfigError(f"not an IP address: {ip!r}") from None
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, federation, days * 4)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _server_certificate(server_key, ca_key, ca_cert, federation,
                                      hostnames, addresses, days)
    write_private_key(paths.ca_key, ca_key)
    write_private_key(paths.server_key, server_key)
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    chain = server_cert.public_bytes(serialization.Encoding.PEM)
    paths.server_cert.write_bytes(chain + ca_cert.public_bytes(
        serialization.Encoding.PEM))
    return paths


def _name(common_name: str, federation: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PriFed"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, federation),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def _ca_certificate(key: ec.EllipticCurvePrivateKey, federation: str,
                    days: int) -> x509.Certificate:
    name = _name(f"PriFed federation CA {federation}", federation)
    start, end = _validity(days)
    public = key.public_key()
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                key_cert_sign=True, crl_sign=True, encipher_only=False,
                decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public),
                           critical=False)
            .sign(key, hashes.SHA256()))


def _server_certificate(key: ec.EllipticCurvePrivateKey,
                        ca_key: ec.EllipticCurvePrivateKey,
                        ca_cert: x509.Certificate, federation: str,
                        hostnames: list[str],
                        addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
                        days: int) -> x509.Certificate:
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    names += [x509.IPAddress(a) for a in addresses]
    common = hostnames[0] if hostnames else str(addresses[0])
    start, end = _validity(days)
    public = key.public_key()
    ca_public = ca_key.public_key()
    return (x509.CertificateBuilder()
            .subject_name(_name(common, federation)).issuer_name(ca_cert.subject)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                           critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=True,
                key_cert_sign=False, crl_sign=False, encipher_only=False,
                decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_public), critical=False)
            .sign(ca_key, hashes.SHA256()))


def write_private_key(path: Path,
                      key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
                      ) -> None:
    """Write a private key as unencrypted PKCS#8 PEM, readable by its owner only."""
    data = key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def generate_site_key() -> ed25519.Ed25519PrivateKey:
    """Generate a site's Ed25519 signing key."""
    return ed25519.Ed25519PrivateKey.generate()


def load_site_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """Read a site's Ed25519 key written by :func:`write_private_key`."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(f"cannot read the site key {path}: "
                          f"{type(error).__name__}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"site key {path} must be an Ed25519 key; got "
                          f"{type(key).__name__}")
    return key


def public_key_bytes(key: ed25519.Ed25519PrivateKey) -> bytes:
    """Return the 32 raw bytes of a site key's public half."""
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def new_join_token() -> str:
    """Return a fresh join token: a prefix and 256 random bits, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """Return the SHA-256 of a join token, the only form the coordinator stores."""
    return hashlib.sha256(token.encode()).hexdigest()


def certificate_fingerprint(path: Path) -> str:
    """Return the SHA-256 fingerprint of the first certificate in a PEM file."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex(":")

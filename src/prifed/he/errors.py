"""Errors of homomorphic aggregation that the core exception tree lacks.

    PriFedError
    └── DecryptionError    a site cannot decrypt an aggregate (names the site)

The coordinator rejects a site's ciphertexts with
:class:`prifed.errors.UpdateRejected`, which also names the site, and rejects
unworkable parameters with :class:`prifed.errors.ConfigError`.
"""

from __future__ import annotations

from prifed.errors import PriFedError


class DecryptionError(PriFedError):
    """A site cannot decrypt an encrypted aggregate, or the result is corrupt."""

    def __init__(self, site: str, reason: str) -> None:
        self.site = site
        self.reason = reason
        super().__init__(f"decryption failed at site {site!r}: {reason}")

"""Exceptions raised by PriFed.

    PriFedError
    ├── ConfigError        a setting or command-line option is invalid
    ├── DataError          a data file, column or site cannot be used
    ├── UpdateRejected     one site's update fails validation (names site, tensor)
    ├── ProtocolError      a message breaks the round protocol (wrong round, replay)
    └── NotSupportedError  a combination of features that PriFed does not offer
"""

from __future__ import annotations


class PriFedError(Exception):
    """Base class of every error PriFed raises on purpose."""


class ConfigError(PriFedError):
    """A setting or command-line option is invalid."""


class DataError(PriFedError):
    """A data file, column or site cannot be used for training."""


class UpdateRejected(PriFedError):
    """One site's update failed validation; the round goes on without it."""

    def __init__(self, site: str, reason: str, tensor: str | None = None) -> None:
        self.site = site
        self.reason = reason
        self.tensor = tensor
        where = f"site {site!r}" + (f", tensor {tensor!r}" if tensor else "")
        super().__init__(f"update rejected from {where}: {reason}")


class ProtocolError(PriFedError):
    """A message breaks the round protocol (wrong round, replay, duplicate)."""


class NotSupportedError(PriFedError):
    """A combination of features that PriFed does not support."""

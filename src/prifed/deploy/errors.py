"""Exceptions of the deployed coordinator and site agent.

    PriFedError (prifed.errors)
    ├── RequestRejected     the coordinator rejects one request (HTTP status, code)
    ├── CoordinatorError    a site agent got a rejection it cannot retry past
    └── ServiceStopped      the coordinator is shutting down; waits are abandoned
"""

from __future__ import annotations

from typing import Any

from prifed.errors import PriFedError


class RequestRejected(PriFedError):
    """The coordinator rejects one request; nothing in its state has changed.

    ``status`` is the HTTP status, ``code`` a stable machine-readable name and
    ``detail`` the sentence a person reads, naming the field or tensor, and
    ``fields`` extra JSON values for the client (such as an upload's offset).
    """

    def __init__(self, status: int, code: str, detail: str,
                 fields: dict[str, Any] | None = None) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.fields = dict(fields or {})
        super().__init__(f"HTTP {status} {code}: {detail}")


class CoordinatorError(PriFedError):
    """The coordinator rejected a site's request with an error the site cannot retry."""

    def __init__(self, status: int, code: str, detail: str,
                 fields: dict[str, Any] | None = None) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.fields = dict(fields or {})
        super().__init__(f"coordinator rejected the request (HTTP {status} {code}): "
                         f"{detail}")


class ServiceStopped(PriFedError):
    """The coordinator is stopping, so the round engine abandons its waits."""

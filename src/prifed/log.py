"""Loggers for PriFed modules and a redactor for text that may carry data."""

from __future__ import annotations

import logging
import re

_PACKAGE = "prifed"
_SECRET = re.compile(
    r"(?i)(token|secret|password|private[_ ]?key|authorization)([\"']?\s*[:=]\s*)\S+"
)


def get_logger(module: str) -> logging.Logger:
    """Return the logger of a module under the package logger."""
    if module.startswith(_PACKAGE):
        return logging.getLogger(module)
    return logging.getLogger(f"{_PACKAGE}.{module}")


def redact(text: str, max_length: int = 300) -> str:
    """Mask secrets in exception text and cut it short before it is logged.

    A traceback can carry a patient value or a token; only the first
    ``max_length`` characters of the message are kept.
    """
    masked = _SECRET.sub(r"\1\2[redacted]", text)
    if len(masked) > max_length:
        masked = masked[:max_length] + "..."
    return masked


def round_label(server_round: int, num_rounds: int) -> str:
    """Format a round as "round 3/20" for log lines."""
    return f"round {server_round}/{num_rounds}"

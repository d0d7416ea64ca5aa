"""FHIR dates as ranges of days, and where a range falls against a window.

FHIR allows partial dates ("2020", "2020-05"). A partial date is kept as the
range of days it may mean, and a window test returns "inside", "outside" or
"straddles", so an imprecise date is never moved to one end of its range.
Days are proleptic Gregorian ordinals (``date.toordinal()``); a dateTime
counts on the calendar day of its own stated offset.
"""

from __future__ import annotations

import calendar
import re
from datetime import date, datetime
from enum import Enum

_PARTIAL = re.compile(r"^([0-9]{4})(?:-([0-9]{2}))?$")


class Placement(Enum):
    """Position of a range of days relative to a window."""

    INSIDE = "inside"
    OUTSIDE = "outside"
    STRADDLES = "straddles"


def day_range(value: object) -> tuple[int, int] | None:
    """Return the first and last day a FHIR date or dateTime may fall on.

    Accepts what fhir.resources returns for date and dateTime elements: a
    ``datetime``, a ``date``, or a year or year-month string. Returns None for
    anything else.
    """
    if isinstance(value, datetime):
        day = value.date().toordinal()
        return day, day
    if isinstance(value, date):
        day = value.toordinal()
        return day, day
    if isinstance(value, str):
        match = _PARTIAL.match(value)
        if match is None:
            return None
        year = int(match.group(1))
        if match.group(2) is None:
            return date(year, 1, 1).toordinal(), date(year, 12, 31).toordinal()
        month = int(match.group(2))
        if not 1 <= month <= 12:
            return None
        last = calendar.monthrange(year, month)[1]
        return date(year, month, 1).toordinal(), date(year, month, last).toordinal()
    return None


def second_of_day(value: object) -> int:
    """Return the local time of day in seconds, or -1 for a date without time."""
    if isinstance(value, datetime):
        return value.hour * 3600 + value.minute * 60 + value.second
    return -1


def place(days: tuple[int, int], after: int, until: int) -> Placement:
    """Place a range of days against the window of days ``after < d <= until``."""
    first, last = days
    if first > after and last <= until:
        return Placement.INSIDE
    if last <= after or first > until:
        return Placement.OUTSIDE
    return Placement.STRADDLES


def completed_years(birth: date, on: date) -> int:
    """Return the age in completed years on a day.

    A 29 February birthday counts on 1 March in common years.
    """
    years = on.year - birth.year
    if (on.month, on.day) < (birth.month, birth.day):
        years -= 1
    return years

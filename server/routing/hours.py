"""Opening hours: ``[server] business_hours`` read into :class:`BusinessHours` (one parser)."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence
from zoneinfo import ZoneInfo

from engine import ConfigError

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RANGE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def _minutes(h: str, m: str, *, end: bool) -> int:
    hh, mm = int(h), int(m)
    if mm > 59 or hh > 24 or (hh == 24 and (mm or not end)):
        raise ValueError(f"bad time {h}:{m}")
    return hh * 60 + mm


class BusinessHours:
    """Opening hours in one time zone.

    ``days`` maps a weekday (``mon`` .. ``sun``, or a full English name) to ``"HH:MM-HH:MM"``,
    several ranges separated by commas, or a list of them.  An empty mapping means always
    open; otherwise a day that is missing or empty is closed.  ``24:00`` is allowed as an end,
    and a range whose end is not after its start runs past midnight into the next day
    (``"22:00-02:00"``).  Start is inclusive, end exclusive.
    """

    def __init__(self, tz: str = "UTC", days: Mapping[str, str | Sequence[str]] | None = None):
        self.tz = ZoneInfo(tz)
        self.tz_name = tz
        self.ranges: dict[int, list[tuple[int, int]]] = {}
        for day, spec in (days or {}).items():
            key = str(day).strip().lower()[:3]
            if key not in _DAYS:
                raise ValueError(f"unknown weekday {day!r}")
            parts = [spec] if isinstance(spec, str) else list(spec)
            out: list[tuple[int, int]] = []
            for part in parts:
                for piece in str(part).split(","):
                    if not piece.strip():
                        continue
                    m = _RANGE.match(piece)
                    if not m:
                        raise ValueError(f"bad range {piece!r} for {day}: want HH:MM-HH:MM")
                    out.append((_minutes(m[1], m[2], end=False), _minutes(m[3], m[4], end=True)))
            self.ranges.setdefault(_DAYS.index(key), []).extend(out)
        self.always_open = not days

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "BusinessHours | None":
        """``{"timezone": "Europe/Berlin", "hours": {"mon": "09:00-17:00", ...}}``; the day
        keys may also sit at the top level.  None or an empty mapping: always open (None)."""
        if not cfg:
            return None
        cfg = dict(cfg)
        tz = cfg.pop("timezone", None) or cfg.pop("tz", None) or "UTC"
        days = cfg.pop("hours", None) or cfg.pop("days", None) or {}
        days = {**days, **{k: v for k, v in cfg.items() if str(k).lower()[:3] in _DAYS}}
        return cls(tz, days)

    def is_open(self, now: datetime) -> bool:
        if self.always_open:
            return True
        if now.tzinfo is None:
            now = now.replace(tzinfo=timezone.utc)
        local = now.astimezone(self.tz)
        minute = local.hour * 60 + local.minute
        today = local.weekday()
        for start, end in self.ranges.get(today, ()):
            if end > start and start <= minute < end:
                return True
            if end <= start and minute >= start:          # overnight range, evening part
                return True
        for start, end in self.ranges.get((today - 1) % 7, ()):
            if end <= start and minute < end:             # yesterday's overnight range
                return True
        return False

    def __repr__(self) -> str:
        return f"BusinessHours({self.tz_name!r}, {self.ranges!r})"




def parse_business_hours(value: Any, tz: str) -> dict[str, Any] | None:
    """``"mon-fri 09:00-18:00; sat 10:00-14:00"`` or a table ``{mon = "09:00-18:00"}`` ->
    the config :meth:`BusinessHours.from_config` reads; empty -> None (always open).  A typo is
    a :class:`ConfigError` naming the setting."""
    if not value:
        return None
    if isinstance(value, dict):
        return {"timezone": tz, "hours": value}
    hours: dict[str, list[str]] = {}
    for part in str(value).split(";"):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"([a-z]{3})(?:\s*-\s*([a-z]{3}))?\s+(.+)", part.lower())
        if not m or m[1] not in _DAYS or (m[2] and m[2] not in _DAYS):
            raise ConfigError(f"server.business_hours: cannot read {part!r} (want e.g. 'mon-fri 09:00-18:00')")
        first, last = _DAYS.index(m[1]), _DAYS.index(m[2] or m[1])
        days = [_DAYS[i % 7] for i in range(first, (last if last >= first else last + 7) + 1)]
        for day in days:
            hours.setdefault(day, []).append(m[3])
    return {"timezone": tz, "hours": hours}


def business_hours(value: Any, tz: str) -> BusinessHours | None:
    """The setting as :class:`BusinessHours` (None: always open); errors are ConfigErrors."""
    try:
        return BusinessHours.from_config(parse_business_hours(value, tz))
    except (ValueError, KeyError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"server.business_hours: {exc}") from None

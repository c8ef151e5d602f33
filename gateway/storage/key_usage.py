"""One API key's usage in a calendar month (UTC), by day and in total, from SQL aggregates.

One `GROUP BY day` over the ledger rows of the key in the month, found through the
`(key_id, timestamp)` index: at most 31 rows reach Python whatever the ledger's size.
Used by `keys usage` (CLI) and `GET /api/v1/keys/<id>/usage` / `/keys/me/usage`.
"""

from __future__ import annotations

import re
import sqlite3
from datetime import UTC, datetime

_MONTH = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")
_BY_DAY = """
SELECT date(timestamp, 'unixepoch') AS day, COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0),
       COALESCE(SUM(total_cost), 0), COALESCE(SUM(cached), 0), COALESCE(SUM(saved_cost), 0)
FROM cost_records WHERE key_id = ? AND timestamp >= ? AND timestamp < ?
GROUP BY day ORDER BY day
"""
_FIELDS = ("requests", "input_tokens", "output_tokens", "cost_usd", "cache_hits", "saved_usd")


def month_of(timestamp: float) -> str:
    """The UTC calendar month of a timestamp, as YYYY-MM."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m")


def month_bounds(month: str) -> tuple[datetime, datetime]:
    """[start, end) of a YYYY-MM month in UTC; ValueError if `month` is not one."""
    match = _MONTH.fullmatch(month) if isinstance(month, str) else None
    if match is None:
        raise ValueError("month must be YYYY-MM")
    year, number = int(match.group(1)), int(match.group(2))
    if year < 1970:
        raise ValueError("month must be YYYY-MM, 1970 or later")
    start = datetime(year, number, 1, tzinfo=UTC)
    end = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=UTC)
    return start, end


def month_usage(reader: sqlite3.Connection, key_id: str, month: str, counter=None) -> dict:
    """The key's totals and per-day figures for `month` (YYYY-MM), read from `reader`'s snapshot."""
    start, end = month_bounds(month)
    cursor = reader.execute(_BY_DAY, (key_id, start.timestamp(), end.timestamp()))
    rows = counter.fetchall(cursor) if counter is not None else cursor.fetchall()
    days = [{"date": row[0], **_figures(row[1:])} for row in rows]
    totals = _figures([sum(row[index] for row in rows) for index in range(1, len(_FIELDS) + 1)])
    return {"key_id": key_id, "month": month, "from": _iso(start), "until": _iso(end), **totals, "by_day": days}


def _figures(values) -> dict:
    figures = dict(zip(_FIELDS, values, strict=True))
    for name in ("cost_usd", "saved_usd"):
        figures[name] = round(figures[name], 10)
    return figures


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")

"""Usage statistics computed by SQLite over the ledger, in bounded memory whatever its size.

`/stats` used to load every row of its window into Python: a 1,000,000-row ledger took 15-17 s
and 1.1 GB per call, holding the GIL. Here the database does the work and Python receives a
number of rows that does not depend on the ledger's size:

- one `GROUP BY endpoint, status, token_source, cached` over the window (found through the
  timestamp index): counts and sums per group, a few dozen rows, which Python adds up into the
  totals, per-endpoint figures, status and token-source counts and cache hits;
- latency percentiles by nearest rank, exactly as `percentiles()` computes them on a list:
  for each of p50/p95/p99 one `ORDER BY latency_ms LIMIT 1 OFFSET k` query, which returns one row.
  When the window holds a large share of the ledger the query walks the covering index
  `(latency_ms, endpoint, timestamp)` in order and stops at the k-th match (no sort, no table
  reads); when the window is a small part of a big ledger it sorts just the window's rows
  (found by time) inside SQLite, whose sorter spills to a temporary file instead of growing.

SQLite releases the GIL while it works, so other requests are served meanwhile, and
concurrent calls for the same window share one computation (`SharedCalls`).
"""

from __future__ import annotations

import copy
import math
import sqlite3
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import TypeVar

T = TypeVar("T")

PERCENTILES = (50, 95, 99)

_GROUPS = """
SELECT endpoint, status, token_source, cached, COUNT(*), SUM(input_tokens), SUM(output_tokens),
       SUM(input_cost), SUM(output_cost), SUM(total_cost), SUM(saved_cost)
FROM cost_records WHERE timestamp >= ?
GROUP BY endpoint, status, token_source, cached
"""


class SharedCalls:
    """Concurrent calls with the same key share one computation: four identical /stats calls at once
    cost one scan, and the other three wait for its result instead of scanning the ledger again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[Hashable, _Flight] = {}

    def run(self, key: Hashable, compute: Callable[[], T]) -> T:
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            return copy.deepcopy(flight.result) if flight.ok else compute()  # a failed leader: try ourselves
        try:
            flight.result = compute()
            flight.ok = True
            return flight.result
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()


class _Flight:
    __slots__ = ("done", "ok", "result")

    def __init__(self) -> None:
        self.done, self.ok, self.result = threading.Event(), False, None


class RowCounter:
    """How many rows the statistics fetched into Python (tests assert it stays constant)."""

    def __init__(self) -> None:
        self.rows = 0

    def each(self, cursor: sqlite3.Cursor) -> Iterator[tuple]:
        """The cursor's rows one at a time (SQLite steps as they are taken: nothing piles up)."""
        for row in cursor:
            self.rows += 1
            yield row

    def fetchall(self, cursor: sqlite3.Cursor) -> list[tuple]:
        rows = cursor.fetchall()
        self.rows += len(rows)
        return rows


def usage_stats(reader: sqlite3.Connection, since: float, counter: RowCounter) -> tuple[dict, dict[str, dict]]:
    """(totals, by endpoint) for records with timestamp >= `since`, from `reader`'s snapshot."""
    groups = counter.fetchall(reader.execute(_GROUPS, (since,)))
    window_rows = sum(group[4] for group in groups)
    ledger_rows = counter.fetchall(reader.execute("SELECT COALESCE(MAX(id), 0) FROM cost_records"))[0][0]
    index = _percentile_index(window_rows, ledger_rows)

    def latency(endpoint: str | None, count: int) -> dict[str, float | None]:
        return _percentiles(reader, counter, index, since, endpoint, count)

    totals = _summarise(groups, latency(None, window_rows))
    by_endpoint = {}
    for endpoint in sorted({group[0] for group in groups}):
        mine = [group for group in groups if group[0] == endpoint]
        by_endpoint[endpoint] = _summarise(mine, latency(endpoint, sum(group[4] for group in mine)))
    return totals, by_endpoint


def _percentile_index(window_rows: int, ledger_rows: int) -> str:
    """Walk the latency index (cost ~ ledger rows) unless sorting the window (~ w log w) is cheaper."""
    if window_rows * math.log2(window_rows + 2) < ledger_rows:
        return "cost_records_by_time"
    return "cost_records_by_latency"


def _percentiles(reader: sqlite3.Connection, counter: RowCounter, index: str, since: float,
                 endpoint: str | None, count: int) -> dict[str, float | None]:
    """p50/p95/p99 by nearest rank over `count` records, one row fetched per percentile."""
    if not count:
        return {f"p{p}": None for p in PERCENTILES}
    where, args = ("timestamp >= ?", [since]) if endpoint is None else ("timestamp >= ? AND endpoint = ?",
                                                                         [since, endpoint])
    sql = (f"SELECT latency_ms FROM cost_records INDEXED BY {index} WHERE {where} "
           "ORDER BY latency_ms LIMIT 1 OFFSET ?")
    result = {}
    for p in PERCENTILES:
        rows = counter.fetchall(reader.execute(sql, (*args, nearest_rank(p, count) - 1)))
        result[f"p{p}"] = round(rows[0][0], 2) if rows else None
    return result


def nearest_rank(p: float, count: int) -> int:
    """The 1-based rank of the p-th percentile among `count` sorted values."""
    return max(1, math.ceil(p / 100 * count))


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 by nearest rank over a list; None when there are no values (the reference for SQL)."""
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    ordered = sorted(values)
    return {f"p{p}": round(ordered[nearest_rank(p, len(ordered)) - 1], 2) for p in PERCENTILES}


def _summarise(groups: list[tuple], latency: dict) -> dict:
    """The figures of one set of groups (all, or one endpoint's), as /stats has always shown them."""
    requests = sum(group[4] for group in groups)
    answered = sum(group[4] for group in groups if group[1] < 400)
    hits = sum(group[4] for group in groups if group[1] < 400 and group[3])
    spent = math.fsum(group[9] for group in groups)
    saved = math.fsum(group[10] for group in groups)
    return {
        "requests": requests,
        "by_status": _tally(groups, 1, str),
        "tokens": {"input": sum(group[5] for group in groups), "output": sum(group[6] for group in groups)},
        "token_sources": _tally(groups, 2, str),
        "cost": {"input": round(math.fsum(group[7] for group in groups), 10),
                 "output": round(math.fsum(group[8] for group in groups), 10),
                 "total": round(spent, 10)},
        "cache": {"hits": hits, "hit_rate": round(hits / answered, 4) if answered else 0.0},
        "cost_saved_by_cache": round(saved, 10),
        "cost_without_cache": round(spent + saved, 10),
        "cost_reduction": round(saved / (spent + saved), 4) if spent + saved else 0.0,
        "latency_ms": latency,
    }


def _tally(groups: list[tuple], column: int, key) -> dict[str, int]:
    counts: dict[str, int] = {}
    for group in groups:
        counts[key(group[column])] = counts.get(key(group[column]), 0) + group[4]
    return dict(sorted(counts.items()))

"""Fill a gateway's cost ledger with many rows before it starts, whatever columns its schema has."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

TASK_PATHS = ("/api/v1/generate/text", "/api/v1/generate/code", "/api/v1/classify/text")


def prefill_ledger(path: Path, rows: int, *, now: float | None = None, window_hours: float = 23.0) -> int:
    """Write `rows` plausible ledger rows, spread over the last `window_hours`, in one transaction.

    The schema is the gateway's own (made by `CostTracker`) and the columns are read from it, so
    this keeps working when the ledger gains columns: a known column gets a plausible value, an
    unknown NOT NULL one without a default a unique text or a zero, any other is left to its default.
    """
    from cost_tracker import CostTracker

    CostTracker(path).close()
    now = time.time() if now is None else now
    start, step = now - window_hours * 3600, window_hours * 3600 / max(rows, 1)
    with contextlib.closing(sqlite3.connect(path)) as db:
        info = db.execute("PRAGMA table_info(cost_records)").fetchall()  # cid, name, type, notnull, default, pk
        columns = [(name, (kind or "").upper(), notnull, default) for _, name, kind, notnull, default, pk in info
                   if not pk]
        known = set(_row(0, 0.0))
        fillers = {}
        for name, kind, notnull, default in columns:
            if name not in known and notnull and default is None:
                text = not kind or any(word in kind for word in ("CHAR", "TEXT", "CLOB"))
                fillers[name] = (lambda i, n=name: f"bench-{n}-{i}") if text else (lambda i: 0)
        names = [name for name, *_ in columns if name in known or name in fillers]

        def generate():
            for i in range(rows):
                row = _row(i, start + i * step)
                yield tuple(row[name] if name in row else fillers[name](i) for name in names)

        db.execute("BEGIN")
        db.executemany(f"INSERT INTO cost_records ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                       generate())
        db.execute("COMMIT")
    return rows


def _row(i: int, timestamp: float) -> dict:
    """One ledger row: mostly answered task requests, some cached, one in ten a 429 with no upstream call."""
    limited, cached = i % 10 == 9, i % 5 == 0
    input_tokens, output_tokens = (0, 0) if limited else (20 + i % 200, 50 + i % 400)
    input_cost, output_cost = input_tokens * 0.1e-6, output_tokens * 0.4e-6
    spent = 0.0 if cached else input_cost + output_cost
    return {"request_id": f"bench-{i:08d}", "timestamp": timestamp, "endpoint": TASK_PATHS[i % 7 % 3],
            "client": f"127.0.0.{1 + i % 50}", "model": "gemini-2.0-flash", "input_tokens": input_tokens,
            "output_tokens": output_tokens, "input_cost": 0.0 if cached else input_cost,
            "output_cost": 0.0 if cached else output_cost, "total_cost": spent, "cached": int(cached and not limited),
            "saved_cost": input_cost + output_cost if cached else 0.0,
            "token_source": "none" if limited else "provider", "latency_ms": 5.0 + i % 900,
            "status": 429 if limited else 200}

"""/stats computed by SQLite: the same figures as a brute-force computation, in bounded work.

The reference below is the computation /stats used to do in Python over every row of the window;
the ledger's answer must match it exactly, and the rows fetched into Python (and the Python
memory used) must not grow with the ledger.
"""

from __future__ import annotations

import csv
import json
import math
import random
import sqlite3
import time
import tracemalloc

import pytest
import requests

from cost_tracker import CostRecord, CostTracker, percentiles
from tests.test_cost_tracker import make_record

TEXT = "/api/v1/generate/text"
ENDPOINTS = ["/api/v1/generate/text", "/api/v1/generate/code", "/api/v1/classify/text"]


def reference_summary(records: list[CostRecord]) -> dict:
    """What the old /stats computed from a list of records (nearest-rank percentiles, fsum)."""
    answered = [r for r in records if r.status < 400]
    hits = sum(r.cached for r in answered)
    spent, saved = math.fsum(r.total_cost for r in records), math.fsum(r.saved_cost for r in records)
    by_status, sources = {}, {}
    for r in records:
        by_status[str(r.status)] = by_status.get(str(r.status), 0) + 1
        sources[r.token_source] = sources.get(r.token_source, 0) + 1
    return {
        "requests": len(records), "by_status": by_status,
        "tokens": {"input": sum(r.input_tokens for r in records), "output": sum(r.output_tokens for r in records)},
        "token_sources": sources,
        "cost": {"input": round(math.fsum(r.input_cost for r in records), 10),
                 "output": round(math.fsum(r.output_cost for r in records), 10), "total": round(spent, 10)},
        "cache": {"hits": hits, "hit_rate": round(hits / len(answered), 4) if answered else 0.0},
        "cost_saved_by_cache": round(saved, 10), "cost_without_cache": round(spent + saved, 10),
        "cost_reduction": round(saved / (spent + saved), 4) if spent + saved else 0.0,
        "latency_ms": percentiles([r.latency_ms for r in records]),
    }


def reference_stats(records: list[CostRecord], hours: float, now: float) -> dict:
    window = [r for r in records if r.timestamp >= now - hours * 3600]
    endpoints = sorted({r.endpoint for r in window})
    return {"window_hours": hours, **reference_summary(window),
            "by_endpoint": {e: reference_summary([r for r in window if r.endpoint == e]) for e in endpoints}}


def random_records(count: int, now: float, seed: int = 7) -> list[CostRecord]:
    rnd = random.Random(seed)
    records = []
    for i in range(count):
        status = rnd.choice([200, 200, 200, 400, 429, 499, 502, 504])
        cost_in, cost_out = rnd.randint(0, 999) * 1e-7, rnd.randint(0, 999) * 1e-7
        cached = status == 200 and rnd.random() < 0.3
        records.append(make_record(
            f"r{i}", timestamp=now - rnd.uniform(0, 30) * 3600, endpoint=rnd.choice(ENDPOINTS),
            input_tokens=rnd.randint(0, 500), output_tokens=rnd.randint(0, 900), input_cost=cost_in,
            output_cost=cost_out, total_cost=0.0 if cached else cost_in + cost_out, cached=cached,
            saved_cost=cost_in + cost_out if cached else 0.0, token_source=rnd.choice(["provider", "estimate", "none"]),
            latency_ms=rnd.choice([round(rnd.uniform(0.5, 3000), 3), 5.0, 5.0]),  # with ties
            status=status))
    return records


@pytest.mark.parametrize("hours", [0.5, 6, 24, 744])
def test_stats_match_a_brute_force_computation(tmp_path, hours):
    now = 5_000_000.0
    tracker = CostTracker(tmp_path / "l.sqlite3", clock=lambda: now)
    records = random_records(600, now)
    for record in records:
        tracker.record(record)
    stats = tracker.get_usage_stats(hours)
    overall = stats.pop("overall_cost")
    assert stats == reference_stats(records, hours, now)
    assert overall == pytest.approx(math.fsum(r.total_cost for r in records), abs=1e-9)
    tracker.close()


def test_both_percentile_plans_agree_with_the_reference(tmp_path):
    """A small window of a big ledger sorts the window; a window holding most of it walks the latency index."""
    now = 5_000_000.0
    tracker = CostTracker(tmp_path / "l.sqlite3", clock=lambda: now)
    old = [make_record(f"old{i}", timestamp=now - 48 * 3600, latency_ms=float(i % 977)) for i in range(3000)]
    recent = random_records(40, now - 0.5 * 3600 + 1, seed=3)  # all within the last hour
    recent = [CostRecord(**{**vars(r), "timestamp": now - 60}) for r in recent]
    for record in old + recent:
        tracker.record(record)
    small = tracker.get_usage_stats(1)  # 40 of 3040 rows: sorted by time
    assert {k: v for k, v in small.items() if k != "overall_cost"} == reference_stats(recent, 1, now)
    large = tracker.get_usage_stats(72)  # every row: the latency index
    assert {k: v for k, v in large.items() if k != "overall_cost"} == reference_stats(old + recent, 72, now)
    tracker.close()


def bulk_insert(ledger, rows: int, now: float) -> None:
    """`rows` records in three endpoints, two statuses and cached or not, written by SQL in a second."""
    with sqlite3.connect(ledger) as db:
        db.execute("""
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
            INSERT INTO cost_records (request_id, timestamp, endpoint, client, model, input_tokens, output_tokens,
                                      input_cost, output_cost, total_cost, cached, saved_cost, token_source,
                                      latency_ms, status)
            SELECT printf('bulk-%d', i), ? - (i % 3000), CASE i % 3 WHEN 0 THEN '/api/v1/generate/text'
                   WHEN 1 THEN '/api/v1/generate/code' ELSE '/api/v1/classify/text' END, '127.0.0.1',
                   'gemini-2.0-flash', i % 50, i % 70, 1e-6, 2e-6, 3e-6, i % 4 = 0, 0.0, 'provider',
                   (i * 7919) % 10007 / 10.0, CASE i % 5 WHEN 0 THEN 502 ELSE 200 END
            FROM n""", (rows, now))


def stats_cost(tracker: CostTracker) -> tuple[int, int, dict]:
    """(rows fetched into Python, peak Python memory in bytes, stats) of one /stats computation."""
    before = tracker.rows_read
    tracemalloc.start()
    try:
        stats = tracker.get_usage_stats(24)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return tracker.rows_read - before, peak, stats


def test_stats_fetch_the_same_few_rows_whatever_the_ledgers_size(tmp_path):
    now = time.time()
    small, big = CostTracker(tmp_path / "small.sqlite3"), CostTracker(tmp_path / "big.sqlite3")
    bulk_insert(small.ledger_path, 600, now)
    bulk_insert(big.ledger_path, 120_000, now)
    small_rows, _, small_stats = stats_cost(small)
    big_rows, big_peak, big_stats = stats_cost(big)
    assert small_stats["requests"] == 600 and big_stats["requests"] == 120_000
    assert big_stats["by_status"] == {"200": 96_000, "502": 24_000}
    assert big_stats["cache"]["hits"] == sum(1 for i in range(1, 120_001) if i % 4 == 0 and i % 5)
    assert big_rows == small_rows <= 40  # groups, one row per percentile, the totals
    assert big_peak < 1_000_000  # loading the rows took ~100 MB for this ledger
    small.close()
    big.close()


def test_export_streams_its_rows(tmp_path):
    tracker = CostTracker(tmp_path / "l.sqlite3")
    bulk_insert(tracker.ledger_path, 10_000, time.time())
    for name in ("out.json", "out.csv"):
        tracemalloc.start()
        try:
            assert tracker.export_records(tmp_path / name, hours=24) == 10_000
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2_000_000, name  # a list of 10,000 dicts is ~9 MB
    rows = json.loads((tmp_path / "out.json").read_text())
    assert len(rows) == 10_000 and rows[0]["request_id"] == "bulk-1" and rows[0]["cached"] is False
    with (tmp_path / "out.csv").open() as handle:
        assert sum(1 for _ in csv.DictReader(handle)) == 10_000
    tracker.close()


def test_stats_has_its_own_rate_limit_and_a_capped_window(make_app, serve):
    server = serve(make_app(ratelimit_stats_limits="3 per minute"))
    assert requests.get(server.url + "/api/v1/stats?hours=745", timeout=10).status_code == 400
    assert requests.get(server.url + "/api/v1/stats?hours=744", timeout=10).status_code == 200
    assert requests.get(server.url + "/api/v1/stats", timeout=10).status_code == 200
    limited = requests.get(server.url + "/api/v1/stats", timeout=10)
    assert limited.status_code == 429
    body = limited.json()
    assert body["code"] == "rate_limited" and body["request_id"] == limited.headers["X-Request-ID"]
    assert int(limited.headers["Retry-After"]) > 0
    assert requests.get(server.url + "/api/v1/health", timeout=10).status_code == 200


def test_the_gateways_own_refusals_write_no_ledger_rows(make_app, serve, emulator):
    """A client hammering a task path past its limit must not grow the ledger (or every later /stats)."""
    app = make_app(ratelimit_task_limits="2 per minute")
    server = serve(app)
    statuses = [requests.post(server.url + TEXT, json={"prompt": f"p{i}"}, timeout=10).status_code
                for i in range(6)]
    assert statuses == [200, 200, 429, 429, 429, 429]
    tracker = app.extensions["gateway"].tracker
    assert [r.status for r in tracker.records()] == [200, 200]
    stats = requests.get(server.url + "/api/v1/stats", timeout=10).json()
    assert stats["usage"]["requests"] == 2
    assert stats["process"]["rate_limited_responses"] == 4  # still counted, as the process's figures

"""The hostile-input benchmark measures what it says: its ledger prefill, slow upload, /health probe
and process-tree handling, each against real servers and processes on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.hostile import json_body
from bench.ledger_prefill import prefill_ledger
from bench.probes import HealthProbe, slow_upload, spooled_bytes
from cost_tracker import CostTracker
from tests.support.marks import linux_only
from tests.support.processes import process_tree, stop_tree

NOW = 1_800_000_000.0


def _ledger(path: Path) -> sqlite3.Connection:
    return contextlib.closing(sqlite3.connect(path))


def test_prefill_fills_the_gateways_own_schema_within_the_window(tmp_path):
    path = tmp_path / "ledger.sqlite3"
    assert prefill_ledger(path, 5000, now=NOW, window_hours=23) == 5000
    with _ledger(path) as db:
        count, distinct, oldest, newest, spent = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT request_id), MIN(timestamp), MAX(timestamp), SUM(total_cost) "
            "FROM cost_records").fetchone()
        overall = db.execute("SELECT total_cost FROM ledger_total").fetchone()[0]
    assert count == distinct == 5000
    assert NOW - 23 * 3600 <= oldest < newest < NOW
    assert spent > 0 and overall == pytest.approx(spent)  # the gateway's all-time total agrees
    tracker = CostTracker(path)
    try:
        assert tracker.overall_cost == pytest.approx(spent)
    finally:
        tracker.close()


def test_prefill_follows_columns_the_ledger_gains(tmp_path):
    """A newer schema (a unique client id, a NOT NULL counter, a defaulted note) is read, not assumed."""
    path = tmp_path / "ledger.sqlite3"
    with _ledger(path) as db:
        db.executescript("""
            CREATE TABLE cost_records (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                request_id TEXT NOT NULL UNIQUE, client_request_id TEXT NOT NULL UNIQUE, attempts INTEGER NOT NULL,
                note TEXT NOT NULL DEFAULT 'none', spare TEXT,
                timestamp REAL NOT NULL, endpoint TEXT NOT NULL, client TEXT NOT NULL,
                model TEXT NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
                input_cost REAL NOT NULL, output_cost REAL NOT NULL, total_cost REAL NOT NULL,
                cached INTEGER NOT NULL, saved_cost REAL NOT NULL, token_source TEXT NOT NULL,
                latency_ms REAL NOT NULL, status INTEGER NOT NULL);
        """)
    prefill_ledger(path, 300, now=NOW)
    with _ledger(path) as db:
        assert db.execute("SELECT COUNT(DISTINCT client_request_id), MAX(attempts), MIN(note), COUNT(spare) "
                          "FROM cost_records").fetchone() == (300, 0, "none", 0)


def _reads_the_body(environ, start_response):
    """A bare WSGI app: reads the whole body, answers "ok"."""
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]


def _upload(url: str, cap: int) -> dict:
    spool_dir = Path(tempfile.gettempdir())
    before = spooled_bytes([os.getpid()], spool_dir)
    return slow_upload(url + "/upload", announced=300_000_000, max_bytes=cap, rate=1e12, max_seconds=30,
                       answer_wait=0.5, sample=lambda: spooled_bytes([os.getpid()], spool_dir) - before)


@linux_only
def test_slow_upload_sees_the_body_spooled_when_the_server_waits_for_all_of_it(serve):
    cap = 3 * 1024 * 1024
    figures = _upload(serve(_reads_the_body).url, cap)  # waitress's default: bodies up to 1 GiB are accepted
    assert figures["answer"] == "no answer" and figures["answered_after_s"] is None
    assert figures["body_bytes_sent"] == cap
    assert figures["peak_spooled_bytes"] >= 2 * 1024 * 1024  # past waitress's 512 KiB in memory, on disk


def test_slow_upload_stops_at_an_early_refusal(serve):
    cap = 8 * 1024 * 1024
    figures = _upload(serve(_reads_the_body, max_request_body_size=1024 * 1024).url, cap)
    assert figures["answer"] in ("413", "closed") and figures["answered_after_s"] is not None
    assert figures["body_bytes_sent"] < cap and figures["peak_spooled_bytes"] == 0


def test_health_probe_counts_answers_and_a_probe_left_waiting(make_app, serve):
    server = serve(make_app(ratelimit_enabled=False))
    with HealthProbe(server.url, timeout=10, interval=0.0) as probe:
        for _ in range(1000):
            if len(probe.latencies_ms) >= 5:
                break
            time.sleep(0.01)
    summary = probe.summary()
    assert summary["probes"] >= 5 and summary["failed"] == summary["unfinished"] == 0
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections (backlog), never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with HealthProbe(url, timeout=30) as waiting:
            for _ in range(1000):
                if waiting._current is not None:
                    break
                time.sleep(0.01)
    assert waiting.summary()["unfinished"] == 1 and len(waiting.latencies_ms) == 1


def test_json_body_is_many_strings_near_the_asked_size():
    body = json_body(1_000_000)
    assert 950_000 <= len(body) <= 1_000_000 and body.count(b'"') > 10_000


@linux_only
def test_stop_tree_also_stops_a_worker_the_launcher_would_orphan():
    parent_code = ("import subprocess, sys, time; "
                   "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    launched = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        for _ in range(500):
            tree = process_tree(launched.pid)
            if len(tree) == 2:
                break
            time.sleep(0.01)
        assert tree[0] == launched.pid and len(tree) == 2
    finally:
        stop_tree(launched)
    child = tree[1]
    assert launched.poll() is not None
    assert not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0] \
        == "Z"

"""Every answered request is billed: under SIGKILL mid-load, and while another connection holds the
ledger's write lock (the record waits in the spool and arrives exactly once)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading

import pytest
import requests

from tests.support.marks import posix_only
from tests.support.processes import ROOT, environment, free_port, stop, wait_for_health


def start_server(tmp_path, port: int, ledger, **settings) -> subprocess.Popen:
    env = environment(HOST="127.0.0.1", PORT=str(port), RATELIMIT_ENABLED="false", LOG_CONSOLE="false",
                      LOG_DIR=str(tmp_path / "logs"), COST_LEDGER_PATH=str(ledger), **settings)
    return subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@posix_only
def test_sigkill_under_load_loses_no_answered_request(tmp_path):
    port, ledger = free_port(), tmp_path / "ledger.sqlite3"
    server = start_server(tmp_path, port, ledger)
    wait_for_health(port, server)
    answered: list[str] = []
    lock, enough, stopping = threading.Lock(), threading.Event(), threading.Event()

    def client(worker: int):
        http = requests.Session()
        for i in range(10_000):
            if stopping.is_set():
                return
            try:
                response = http.post(f"http://127.0.0.1:{port}/api/v1/generate/text",
                                     json={"prompt": f"worker {worker} request {i}"}, timeout=10)
            except requests.RequestException:
                return  # the server is gone
            if response.status_code == 200:
                with lock:
                    answered.append(response.headers["X-Request-ID"])
                    if len(answered) >= 150:
                        enough.set()

    workers = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for worker in workers:
        worker.start()
    assert enough.wait(timeout=60), "the load did not get going"
    os.kill(server.pid, signal.SIGKILL)  # mid-load: requests are in flight
    server.wait(timeout=10)
    stopping.set()
    for worker in workers:
        worker.join(timeout=15)

    with sqlite3.connect(ledger) as db:
        recorded = {row[0] for row in db.execute("SELECT request_id FROM cost_records")}
    missing = set(answered) - recorded
    assert not missing, f"{len(missing)} answered requests missing from the ledger"

    restarted = start_server(tmp_path, port, ledger)
    try:
        wait_for_health(port, restarted)
        stats = requests.get(f"http://127.0.0.1:{port}/api/v1/stats", timeout=10).json()
        assert stats["usage"]["requests"] >= len(answered)
    finally:
        stop(restarted)


def spooled(ledger) -> list[dict]:
    spool = ledger.parent / f"{ledger.name}.spool"
    return [json.loads(line) for path in sorted(spool.glob("*.jsonl")) for line in path.read_text().splitlines()]


def rows(ledger) -> list[tuple[str, float]]:
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        return db.execute("SELECT request_id, total_cost FROM cost_records ORDER BY id").fetchall()


def ledger_total(ledger) -> float:
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        return db.execute("SELECT total_cost FROM ledger_total").fetchone()[0]


def test_a_locked_ledger_still_answers_and_bills_the_request_once(make_app, serve):
    """Another connection holding the write lock used to turn a paid answer into a 500 after 30 s, unbilled."""
    app = make_app(ratelimit_enabled=False, cost_ledger_write_timeout_seconds=0.2)
    server, ledger = serve(app), app.extensions["gateway"].config.cost_ledger_path
    holder = sqlite3.connect(ledger, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        response = requests.post(f"{server.url}/api/v1/generate/text", json={"prompt": "while locked"}, timeout=15)
        assert response.status_code == 200, response.text
        request_id = response.headers["X-Request-ID"]
        assert response.json()["request_id"] == request_id and float(response.headers["X-Cost-Total"]) > 0
        assert [line["request_id"] for line in spooled(ledger)] == [request_id]
        assert rows(ledger) == []
    finally:
        holder.execute("ROLLBACK")
    app.extensions["gateway"].tracker.replay_spool()  # what the background thread does within a second
    assert [row[0] for row in rows(ledger)] == [request_id] and spooled(ledger) == []
    assert ledger_total(ledger) == pytest.approx(float(response.headers["X-Cost-Total"]), abs=1e-9)
    stats = requests.get(f"{server.url}/api/v1/stats", timeout=10).json()
    assert stats["usage"]["requests"] == 1


@posix_only
def test_a_spool_left_by_a_killed_server_is_replayed_once_at_restart(tmp_path):
    port, ledger = free_port(), tmp_path / "ledger.sqlite3"
    settings = {"COST_LEDGER_WRITE_TIMEOUT_SECONDS": "0.2"}
    server = start_server(tmp_path, port, ledger, **settings)
    wait_for_health(port, server)
    holder = sqlite3.connect(ledger, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    response = requests.post(f"http://127.0.0.1:{port}/api/v1/generate/text", json={"prompt": "paid"}, timeout=15)
    assert response.status_code == 200
    request_id, cost = response.headers["X-Request-ID"], float(response.headers["X-Cost-Total"])
    os.kill(server.pid, signal.SIGKILL)  # before any replay: the lock is still held
    server.wait(timeout=10)
    holder.execute("ROLLBACK")
    holder.close()
    leftover = spooled(ledger)
    assert [line["request_id"] for line in leftover] == [request_id] and rows(ledger) == []

    for _ in range(2):  # the first restart replays it; the second finds nothing more to add
        restarted = start_server(tmp_path, port, ledger, **settings)
        try:
            wait_for_health(port, restarted)
            assert [row[0] for row in rows(ledger)] == [request_id] and spooled(ledger) == []
            assert ledger_total(ledger) == pytest.approx(cost, abs=1e-9)
        finally:
            stop(restarted)


def log_lines(app, name: str) -> list[dict]:
    app.extensions["gateway"].logger.flush()
    path = app.extensions["gateway"].config.log_dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_paid_answer_that_can_be_neither_committed_nor_spooled_still_reaches_the_client(make_app, serve):
    """Ledger locked and the spool unwritable (a file where its folder goes, as a full disk would):
    the answers go out anyway, and each record is logged in full, said to be unrecorded."""
    app = make_app(ratelimit_enabled=False, cost_ledger_write_timeout_seconds=0.05)
    server, ledger = serve(app), app.extensions["gateway"].config.cost_ledger_path
    (ledger.parent / f"{ledger.name}.spool").write_text("")  # the spool folder cannot be made
    holder = sqlite3.connect(ledger, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        plain = requests.post(f"{server.url}/api/v1/generate/text", json={"prompt": "paid, plain"}, timeout=15)
        streamed = requests.post(f"{server.url}/api/v1/generate/text/stream", json={"prompt": "paid, streamed"},
                                 timeout=15)
    finally:
        holder.execute("ROLLBACK")
    assert plain.status_code == 200, plain.text
    assert plain.json()["generated_text"] and float(plain.headers["X-Cost-Total"]) > 0
    assert "X-Cost-Overall" in plain.headers
    assert streamed.status_code == 200
    events = [block.split("\n")[0] for block in streamed.text.strip().split("\n\n")]
    assert events[-1] == "event: done" and "event: chunk" in events, streamed.text
    ids = {plain.headers["X-Request-ID"], streamed.headers["X-Request-ID"]}
    assert rows(ledger) == []
    unrecorded = [line for line in log_lines(app, "cost_tracking.log") if line.get("unrecorded")]
    assert {line["request_id"] for line in unrecorded} == ids
    assert all(line["total_cost"] > 0 and line["input_tokens"] > 0 for line in unrecorded)
    errors = [line for line in log_lines(app, "api_errors.log") if line.get("unrecorded")]
    assert {line["request_id"] for line in errors} == ids and all("missing from the ledger" in line["note"]
                                                                  for line in errors)

"""A server killed with SIGKILL under load has already recorded every request it answered."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading

import pytest
import requests

from tests.test_startup import ROOT, environment, free_port, stop, wait_for_health

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX-only")


def start_server(tmp_path, port: int, ledger) -> subprocess.Popen:
    env = environment(HOST="127.0.0.1", PORT=str(port), RATELIMIT_ENABLED="false", LOG_CONSOLE="false",
                      LOG_DIR=str(tmp_path / "logs"), COST_LEDGER_PATH=str(ledger))
    return subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


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

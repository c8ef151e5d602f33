"""/stats over a big ledger: time per call, the server's peak memory, and /health meanwhile.

    python -m bench.stats_ledger [--rows 1000000] [--concurrent 4]

Builds a ledger of --rows records (written by SQL in a few seconds, spread over the last 20
hours like real traffic), serves the gateway on it under waitress (production settings, no
upstream needed), then measures one /stats call, --concurrent /stats calls at once with /health
polled meanwhile, and the server's peak resident memory (VmHWM, Linux). Loopback only; every
loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.harness import gateway
from cost_tracker import CostTracker

_BULK = """
WITH RECURSIVE n(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM n WHERE i < ?)
INSERT INTO cost_records (request_id, timestamp, endpoint, client, model, input_tokens, output_tokens, input_cost,
                          output_cost, total_cost, cached, saved_cost, token_source, latency_ms, status)
SELECT lower(hex(randomblob(16))), ? + i * ?, CASE i % 4 WHEN 0 THEN '/api/v1/generate/text'
       WHEN 1 THEN '/api/v1/generate/code' WHEN 2 THEN '/api/v1/classify/text' ELSE '/api/v1/generate/text/stream' END,
       '127.0.0.1', 'gemini-2.0-flash', abs(random() % 500), abs(random() % 900), 1e-6, 2e-6, 3e-6,
       abs(random() % 10) < 3, 0.0, 'provider', abs(random() % 300000) / 100.0,
       CASE abs(random() % 6) WHEN 0 THEN 429 WHEN 1 THEN 502 ELSE 200 END
FROM n
"""


def build_ledger(path: Path, rows: int, chunk: int = 200_000) -> None:
    CostTracker(path).close()  # the current schema and indexes
    start, step = time.time() - 20 * 3600, 20 * 3600 / max(rows, 1)
    with sqlite3.connect(path) as db:
        for first in range(1, rows + 1, chunk):
            db.execute(_BULK, (first, min(rows, first + chunk - 1), start, step))
            db.commit()


def peak_rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return round(next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024, 1)


def measure(url: str, concurrent: int) -> dict:
    started = time.perf_counter()
    single = requests.get(url + "/api/v1/stats", timeout=600)
    single_s = time.perf_counter() - started
    assert single.status_code == 200, single.text
    health_ms, times = [], []

    def stats_call():
        began = time.perf_counter()
        requests.get(url + "/api/v1/stats", timeout=600).raise_for_status()
        times.append(time.perf_counter() - began)

    callers = [threading.Thread(target=stats_call) for _ in range(concurrent)]
    for caller in callers:
        caller.start()
    for _ in range(100_000):  # /health while the calls run (bounded)
        if not any(caller.is_alive() for caller in callers):
            break
        began = time.perf_counter()
        requests.get(url + "/api/v1/health", timeout=600)
        health_ms.append((time.perf_counter() - began) * 1000)
        time.sleep(0.05)
    for caller in callers:
        caller.join()
    return {"requests_in_window": single.json()["usage"]["requests"], "one_call_s": round(single_s, 2),
            f"{concurrent}_at_once_max_s": round(max(times), 2),
            "health_max_ms_meanwhile": round(max(health_ms), 1) if health_ms else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--concurrent", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stats-bench-") as workdir:
        ledger = Path(workdir) / "ledger.sqlite3"
        began = time.perf_counter()
        build_ledger(ledger, args.rows)
        built_s = time.perf_counter() - began
        env = {"COST_LEDGER_PATH": str(ledger), "RATELIMIT_STATS_LIMITS": "1000 per minute"}
        with gateway("http://127.0.0.1:9", extra_env=env) as (url, process):
            requests.get(url + "/api/v1/health", timeout=10)
            before = peak_rss_mb(process.pid)
            figures = measure(url, args.concurrent)
            figures["server_peak_rss_mb_before_stats"] = before
            figures["server_peak_rss_mb"] = peak_rss_mb(process.pid)
    figures.update(ledger_rows=args.rows, ledger_build_s=round(built_s, 1))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

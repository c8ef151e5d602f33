"""What one anonymous client's pathological requests cost the gateway (issue 8), and /health meanwhile.

    python -m bench.hostile [--cases spaces,json_body,big_upload,paths_404,stats_1m] [--ledger-rows 1000000]
    python -m bench.run --only hostile          # the same, as part of the benchmark suite

Each case gets a fresh serve.py (production settings, the emulator upstream) so one case's
leftovers (a thread still matching a regex, memory) do not colour the next. While a case's
requests run, another thread sends GET /api/v1/health on a fresh connection every 50 ms and its
median and p99 are reported: with several workers the kernel spreads those connections, so the
p99 shows a frozen worker even when the median does not. The cases:

- spaces: GET `/key` + `%20` x 60,000 + `x` (the log redaction's backtracking path);
- json_body: 3 clients x 2 POSTs of a 1 MB JSON body of many strings (the security scan);
- big_upload: a POST announcing 300,000,000 bytes whose body is sent slowly and only partly: the
  bytes sent before the server answered (or closed), when it answered, and how much it spooled
  to temporary files (read from the server processes' open descriptors, Linux);
- paths_404: 500 distinct 50 KB paths: the server's resident memory growth and /stats's size;
- stats_1m: /api/v1/stats?hours=24 over a ledger prefilled with 1,000,000 rows in its window,
  once, then 4 at once: time per call and the server processes' peak resident memory (VmHWM).

Every request has a client timeout (--timeout) and every loop a count or time bound; a request
that times out is reported as "timeout". Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import sqlite3
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

from bench.harness import ROOT, emulator, launcher, memory_kb, quantile, tree_memory_mb
from bench.loadgen import Connection, build_post, build_request

RESULTS = Path(__file__).resolve().parent / "results"
CASES = ("spaces", "json_body", "big_upload", "paths_404", "stats_1m")
HEALTH = "/api/v1/health"
TASK_PATHS = ("/api/v1/generate/text", "/api/v1/generate/code", "/api/v1/classify/text")
MB = 1024 * 1024


# --- /health from another thread ----------------------------------------------------------------

class HealthProbe:
    """GET /health from its own thread, one fresh connection per probe, until the `with` block ends.

    A probe still waiting 1 s after the block ends is cut short and counted with the time it had
    waited (a lower bound), so a frozen server cannot hide behind the end of the case.
    """

    def __init__(self, url: str, timeout: float, interval: float = 0.05, max_probes: int = 100_000):
        self.url, self.timeout, self.interval, self.max_probes = url + HEALTH, timeout, interval, max_probes
        self.latencies_ms: list[float] = []
        self.failed = self.unfinished = 0
        self._stop = threading.Event()
        self._current: Connection | None = None
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join(1.0)  # a probe in flight on a healthy server finishes well within this
        current = self._current
        if current is not None:
            with contextlib.suppress(OSError):
                current.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(self.timeout + 5)

    def _run(self) -> None:
        request = build_request("GET", self.url)
        for _ in range(self.max_probes):
            if self._stop.is_set():
                return
            sent = time.perf_counter()
            try:
                self._current = Connection(self.url, self.timeout)
                status, _ = self._current.exchange(request)
            except OSError:
                status = None
            finally:
                if self._current is not None:
                    self._current.close()
                self._current = None
            waited = (time.perf_counter() - sent) * 1000
            if status == 200:
                self.latencies_ms.append(waited)
            elif self._stop.is_set():
                self.unfinished += 1
                self.latencies_ms.append(waited)
            else:
                self.failed += 1
            self._stop.wait(self.interval)

    def summary(self) -> dict:
        values = self.latencies_ms
        return {"probes": len(values) + self.failed, "p50_ms": _round(statistics.median(values)) if values else None,
                "p99_ms": _round(quantile(values, 0.99)) if values else None,
                "max_ms": _round(max(values)) if values else None,
                "failed": self.failed, "unfinished": self.unfinished}


# --- one request, timed --------------------------------------------------------------------------

def timed_exchange(url: str, request: bytes, timeout: float) -> dict:
    """Send `request` on a fresh connection: {"status": code | "timeout" | "closed", "seconds", "body_bytes"}."""
    started = time.perf_counter()
    connection = None
    try:
        connection = Connection(url, timeout)
        status, body = connection.exchange(request)
        outcome = {"status": status, "body_bytes": len(body),
                   "server_ms": _float(connection.headers.get("x-response-time-ms"))}
    except TimeoutError:
        outcome = {"status": "timeout"}
    except OSError:
        outcome = {"status": "closed"}
    finally:
        if connection is not None:
            connection.close()
    return {**outcome, "seconds": round(time.perf_counter() - started, 3)}


def _timings(outcomes: list[dict]) -> dict:
    seconds = [outcome["seconds"] for outcome in outcomes]
    return {"requests": len(outcomes), "statuses": dict(Counter(str(outcome["status"]) for outcome in outcomes)),
            "seconds_p50": round(statistics.median(seconds), 3) if seconds else None,
            "seconds_max": round(max(seconds), 3) if seconds else None}


# --- the cases -----------------------------------------------------------------------------------

def case_spaces(server, args) -> dict:
    """a. A long run of encoded spaces in the path (issue 8, item 1)."""
    url = server.url
    request = build_request("GET", url + "/key" + "%20" * args.spaces + "x")
    with HealthProbe(url, args.timeout) as probe:
        time.sleep(0.3)
        outcomes = [timed_exchange(url, request, args.timeout) for _ in range(args.spaces_requests)]
    return {**_timings(outcomes), "request_bytes": len(request), "outcomes": outcomes, "health": probe.summary()}


def json_body(size: int) -> bytes:
    """A task request of about `size` bytes whose bulk is many short strings, each a scan target."""
    item = "SELECT " * 20
    count = max(1, (size - 60) // (len(item) + 10))
    return json.dumps({"prompt": "Summarise these notes", "notes": [f"{i} {item}" for i in range(count)]}).encode()


def case_json_body(server, args) -> dict:
    """b. 1 MB JSON bodies of many strings from 3 clients at once (issue 8, item 3)."""
    url = server.url + TASK_PATHS[0]
    body = json_body(args.json_bytes)
    request = build_post(url, body)
    outcomes: list[dict] = []
    lock = threading.Lock()

    def client() -> None:
        mine = [timed_exchange(url, request, args.timeout) for _ in range(args.json_requests)]
        with lock:
            outcomes.extend(mine)

    with HealthProbe(server.url, args.timeout) as probe:
        time.sleep(0.3)
        threads = [threading.Thread(target=client, daemon=True) for _ in range(args.json_clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(args.timeout * args.json_requests + 10)
    server_ms = [o["server_ms"] for o in outcomes if o.get("server_ms") is not None]
    return {**_timings(outcomes), "body_bytes": len(body), "clients": args.json_clients,
            "server_ms_p50": _round(statistics.median(server_ms)) if server_ms else None, "health": probe.summary()}


def spooled_bytes(pids: list[int], directory: Path) -> int:
    """Bytes in the files under `directory` that the processes hold open (deleted temp files included)."""
    total, prefix = 0, str(directory)
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in descriptors:
            path = f"/proc/{pid}/fd/{fd}"
            try:
                if os.readlink(path).startswith(prefix):
                    total += os.stat(path).st_size
            except OSError:
                continue
    return total


def slow_upload(url: str, *, announced: int, max_bytes: int, rate: float, max_seconds: float, answer_wait: float,
                sample=lambda: 0) -> dict:
    """POST announcing `announced` bytes; send at most `max_bytes` at about `rate` bytes/s for at most
    `max_seconds`, watching for an answer before each chunk, then wait `answer_wait` s for one.

    `sample()` is called now and then (the server's spooled bytes); its largest value is reported.
    """
    host_url = url + TASK_PATHS[0]
    head = build_request("POST", host_url, headers={"Content-Type": "application/json"})
    head = head.replace(b"Content-Length: 0", f"Content-Length: {announced}".encode())
    chunk = b"[" + b"1," * 32767 + b"1"  # 64 KiB of valid-looking JSON
    sent, answer, answered_at, peak, started = 0, None, None, 0, time.perf_counter()
    sock = socket.create_connection(_address(url), timeout=5)
    try:
        sock.sendall(head)
        last_sample = 0.0
        while sent < max_bytes and time.perf_counter() - started < max_seconds:
            if select.select([sock], [], [], 0)[0]:
                answer, answered_at = _read_answer(sock), time.perf_counter()
                break
            piece = chunk[:max_bytes - sent]
            try:
                sock.sendall(piece)
            except TimeoutError:
                break  # the server stopped reading: see whether it answers
            except OSError:
                answer, answered_at = "closed", time.perf_counter()
                break
            sent += len(piece)
            if time.perf_counter() - last_sample > 0.2:
                peak, last_sample = max(peak, sample()), time.perf_counter()
            time.sleep(max(0.0, started + sent / rate - time.perf_counter()))
        sending_done = time.perf_counter()
        if answer is None:
            peak = max(peak, sample())
            if select.select([sock], [], [], answer_wait)[0]:
                answer, answered_at = _read_answer(sock), time.perf_counter()
        peak = max(peak, sample())
    finally:
        sock.close()
    return {"announced_bytes": announced, "body_bytes_sent": sent, "answer": answer or "no answer",
            "answered_after_s": None if answered_at is None else round(answered_at - started, 3),
            "sending_seconds": round(sending_done - started, 3), "peak_spooled_bytes": peak}


def _read_answer(sock: socket.socket) -> str:
    try:
        data = sock.recv(4096)
    except OSError:
        return "closed"
    if not data:
        return "closed"
    first = data.split(b"\r\n", 1)[0].decode("latin-1").split()
    return first[1] if len(first) > 1 else "closed"


def _address(url: str) -> tuple[str, int]:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def case_big_upload(server, args) -> dict:
    """c. A body announced far above the limit, sent slowly and partly (issue 8, item 4)."""
    tmp = server.workdir / "tmp"
    with HealthProbe(server.url, args.timeout) as probe:
        figures = slow_upload(server.url, announced=300_000_000, max_bytes=int(args.upload_mb * MB),
                              rate=args.upload_rate_mb * MB, max_seconds=args.upload_seconds, answer_wait=5.0,
                              sample=lambda: spooled_bytes(server.pids(), tmp))
    left_in_dir = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    return {**figures, "temp_dir_bytes_after": left_in_dir, "health": probe.summary()}


def case_paths_404(server, args) -> dict:
    """e. Many distinct long unrouted paths: memory kept per path and /stats's size (issue 8, item 6)."""
    url = server.url
    filler = ("abcdefghij" * (args.path_bytes // 10 + 1))[:args.path_bytes]
    before = _rss_mb(server)
    with HealthProbe(url, args.timeout) as probe:
        outcomes = [timed_exchange(url, build_request("GET", f"{url}/missing/{i:05d}/{filler}"), args.timeout)
                    for i in range(args.paths)]
    time.sleep(0.5)
    after = _rss_mb(server)
    stats = [timed_exchange(url, build_request("GET", url + "/api/v1/stats?hours=1"), args.timeout)
             for _ in range(8)]  # fresh connections: with several workers, each is asked
    return {**_timings(outcomes), "path_bytes": args.path_bytes, "rss_before_mb": before, "rss_after_mb": after,
            "rss_growth_mb": round(after - before, 1) if before is not None and after is not None else None,
            "stats_body_bytes_max": max((s.get("body_bytes", 0) for s in stats), default=0),
            "stats_statuses": dict(Counter(str(s["status"]) for s in stats)), "health": probe.summary()}


def case_stats_1m(upstream: str, args) -> dict:
    """d. /stats over a ledger of `--ledger-rows` rows in its window: time and peak memory (issue 8, item 5)."""
    timing: dict = {}

    def prepare(workdir: Path) -> None:
        started = time.perf_counter()
        prefill_ledger(workdir / "ledger.sqlite3", args.ledger_rows)
        timing["prefill_seconds"] = round(time.perf_counter() - started, 1)

    with launcher(upstream, workers=args.workers, threads=args.threads, prepare=prepare) as server:
        url, request = server.url, build_request("GET", server.url + "/api/v1/stats?hours=24")
        hwm_before = tree_memory_mb(server.process.pid)
        with HealthProbe(url, args.timeout) as probe:
            time.sleep(0.3)
            single = timed_exchange(url, request, args.timeout)
            concurrent: list[dict] = []
            threads = [threading.Thread(target=lambda: concurrent.append(timed_exchange(url, request, args.timeout)),
                                        daemon=True) for _ in range(args.stats_concurrent)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(args.timeout + 10)
        hwm_after = tree_memory_mb(server.process.pid)
    return {"ledger_rows": args.ledger_rows, **timing, "single": single, "concurrent": _timings(concurrent),
            "concurrent_outcomes": concurrent, "peak_rss_before_mb": hwm_before, "peak_rss_mb_by_pid": hwm_after,
            "peak_rss_mb": max(hwm_after.values(), default=None), "health": probe.summary()}


def _rss_mb(server) -> float | None:
    figures = [memory_kb(pid, "VmRSS") for pid in server.pids()]
    return round(sum(figures) / 1024, 1) if figures and None not in figures else None


# --- the ledger prefill --------------------------------------------------------------------------

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


# --- running and printing -------------------------------------------------------------------------

def measure(upstream: str, args) -> dict:
    """Run the chosen cases, each against its own fresh gateway; returns their figures."""
    wanted = [case for case in CASES if case in set(args.cases.split(","))]
    results: dict = {"settings": {"timeout_s": args.timeout, "workers": args.workers, "threads": args.threads}}
    with launcher(upstream, workers=args.workers, threads=args.threads) as server, \
            HealthProbe(server.url, args.timeout) as idle:
        time.sleep(1.0)
    results["idle_health"] = idle.summary()
    for case in wanted:
        started = time.perf_counter()
        if case == "stats_1m":
            results[case] = case_stats_1m(upstream, args)
        else:
            with launcher(upstream, workers=args.workers, threads=args.threads) as server:
                results[case] = globals()[f"case_{case}"](server, args)
        results[case]["case_seconds"] = round(time.perf_counter() - started, 1)
    return results


def table(results: dict) -> str:
    rows = [("hostile input", "requests", "statuses", "s p50", "s max", "/health p50 ms", "/health p99 ms",
             "/health max ms", "what else")]

    def row(name, figures, timings, extra):
        health = figures["health"]
        rows.append((name, str(timings["requests"]), _statuses(timings["statuses"]), _cell(timings["seconds_p50"]),
                     _cell(timings["seconds_max"]), _cell(health["p50_ms"]), _cell(health["p99_ms"]),
                     _cell(health["max_ms"]), extra))

    idle = results["idle_health"]
    rows.append(("(idle gateway)", "", "", "", "", _cell(idle["p50_ms"]), _cell(idle["p99_ms"]), _cell(idle["max_ms"]),
                 f"{idle['probes']} probes"))
    if "spaces" in results:
        r = results["spaces"]
        row("a. GET /key+%20x60000", r, r, f"request {r['request_bytes'] / 1000:.0f} KB")
    if "json_body" in results:
        r = results["json_body"]
        row(f"b. {r['body_bytes'] / 1e6:.1f} MB JSON x{r['requests']}", r, r,
            f"{r['clients']} clients; server p50 {_cell(r['server_ms_p50'])} ms")
    if "big_upload" in results:
        r = results["big_upload"]
        answered = f"answer {r['answer']} after {r['answered_after_s']} s" if r["answered_after_s"] is not None \
            else f"no answer in {r['sending_seconds']} s + 5 s"
        timings = {"requests": 1, "statuses": {r["answer"]: 1}, "seconds_p50": r["answered_after_s"],
                   "seconds_max": r["answered_after_s"]}
        row("c. POST Content-Length 300 MB", r, timings,
            f"{r['body_bytes_sent'] / MB:.1f} MiB sent, {answered}; spooled {r['peak_spooled_bytes'] / MB:.1f} MiB")
    if "paths_404" in results:
        r = results["paths_404"]
        row(f"e. {r['requests']} 404 paths of {r['path_bytes'] // 1000} KB", r, r,
            f"RSS +{_cell(r['rss_growth_mb'])} MB; /stats body {r['stats_body_bytes_max'] / 1e6:.2f} MB")
    if "stats_1m" in results:
        r = results["stats_1m"]
        single = r["single"]
        row(f"d. /stats over {r['ledger_rows']:,} rows, 1", r,
            {"requests": 1, "statuses": {str(single["status"]): 1}, "seconds_p50": single["seconds"],
             "seconds_max": single["seconds"]},
            f"prefill {r.get('prefill_seconds')} s")
        row(f"d. /stats over {r['ledger_rows']:,} rows, {r['concurrent']['requests']} at once", r, r["concurrent"],
            f"peak RSS {_cell(r['peak_rss_mb'])} MB (VmHWM per pid {r['peak_rss_mb_by_pid']})")
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).rjust(width) if 0 < i < len(widths) - 1 else str(cell).ljust(width)
                       for i, (cell, width) in enumerate(zip(r, widths, strict=True))).rstrip() for r in rows]
    lines.append(f"(s: client-side seconds per request; /health: GET on a fresh connection every 50 ms from another "
                 f"thread while the case ran, one probe for both d. rows; client timeout "
                 f"{results['settings']['timeout_s']:.0f} s, \"timeout\" = no answer by then; each case on a fresh "
                 f"serve.py with {results['settings']['workers']} workers)")
    return "\n".join(lines)


def _statuses(statuses: dict) -> str:
    return ",".join(f"{status}x{count}" if count > 1 else status for status, count in sorted(statuses.items()))


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _round(value: float) -> float:
    return round(value, 1)


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The hostile cases' options (shared by `bench.run` and `bench.hostile`)."""
    group = parser.add_argument_group("hostile inputs (issue 8)")
    group.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    group.add_argument("--timeout", type=float, default=60.0, help="client timeout of each hostile request, s")
    group.add_argument("--spaces", type=int, default=60_000, help="encoded spaces in the path (a)")
    group.add_argument("--spaces-requests", type=int, default=1, help="how many such requests, one after another")
    group.add_argument("--json-bytes", type=int, default=1_000_000, help="size of each JSON body (b)")
    group.add_argument("--json-clients", type=int, default=3)
    group.add_argument("--json-requests", type=int, default=2, help="requests per client (b)")
    group.add_argument("--upload-mb", type=float, default=20.0, help="most MiB of body actually sent (c)")
    group.add_argument("--upload-rate-mb", type=float, default=4.0, help="MiB/s at which it is sent (c)")
    group.add_argument("--upload-seconds", type=float, default=15.0, help="most seconds spent sending (c)")
    group.add_argument("--paths", type=int, default=500, help="distinct 404 paths (e)")
    group.add_argument("--path-bytes", type=int, default=50_000)
    group.add_argument("--ledger-rows", type=int, default=1_000_000, help="ledger rows in /stats's window (d)")
    group.add_argument("--stats-concurrent", type=int, default=4)


def quick(args) -> None:
    """Smaller inputs: a smoke check of the cases, not figures."""
    args.timeout, args.spaces, args.json_requests, args.upload_mb = 20.0, 20_000, 1, 5.0
    args.paths, args.ledger_rows = 100, 100_000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=128, help="waitress threads per worker")
    parser.add_argument("--quick", action="store_true", help="smaller inputs: a smoke check, not figures")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        quick(args)
    started = time.monotonic()
    with emulator() as upstream:
        results = measure(upstream, args)
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hostile.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"(took {results['wall_seconds']} s; JSON in {RESULTS / 'hostile.json'}; code at {ROOT})")


if __name__ == "__main__":
    main()

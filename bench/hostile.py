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
import json
import os
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

from bench.harness import ROOT, emulator, launcher, memory_kb, tree_memory_mb
from bench.ledger_prefill import TASK_PATHS, prefill_ledger
from bench.loadgen import build_post, build_request
from bench.probes import HealthProbe, round_ms, slow_upload, spooled_bytes, timed_exchange

RESULTS = Path(__file__).resolve().parent / "results"
CASES = ("spaces", "json_body", "big_upload", "paths_404", "stats_1m")
MB = 1024 * 1024


# --- the cases -----------------------------------------------------------------------------------

def _timings(outcomes: list[dict]) -> dict:
    seconds = [outcome["seconds"] for outcome in outcomes]
    return {"requests": len(outcomes), "statuses": dict(Counter(str(outcome["status"]) for outcome in outcomes)),
            "seconds_p50": round(statistics.median(seconds), 3) if seconds else None,
            "seconds_max": round(max(seconds), 3) if seconds else None}


def case_spaces(server, args) -> dict:
    """a. A long run of encoded spaces in the path (issue 8, item 1)."""
    url = server.url
    request = build_request("GET", url + "/key" + "%20" * args.spaces + "x")
    with HealthProbe(url, args.timeout) as probe:
        time.sleep(0.3)
        outcomes = [timed_exchange(url, request, args.timeout) for _ in range(args.spaces_requests)]
    return {**_timings(outcomes), "spaces": args.spaces, "request_bytes": len(request), "outcomes": outcomes,
            "health": probe.summary()}


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
            "server_ms_p50": round_ms(statistics.median(server_ms)) if server_ms else None, "health": probe.summary()}


def case_big_upload(server, args) -> dict:
    """c. A body announced far above the limit, sent slowly and partly (issue 8, item 4)."""
    tmp = server.workdir / "tmp"
    with HealthProbe(server.url, args.timeout) as probe:
        figures = slow_upload(server.url + TASK_PATHS[0], announced=300_000_000, max_bytes=int(args.upload_mb * MB),
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
        row(f"a. GET /key+%20x{r['spaces']}+x", r, r, f"request {r['request_bytes'] / 1000:.0f} KB")
    if "json_body" in results:
        r = results["json_body"]
        row(f"b. {r['body_bytes'] / 1e6:.1f} MB JSON x{r['requests']}", r, r,
            f"{r['clients']} clients; server p50 {_cell(r['server_ms_p50'])} ms")
    if "big_upload" in results:
        r = results["big_upload"]
        answered = f"answer {r['answer']} after {r['answered_after_s']} s" if r["answered_after_s"] is not None \
            else f"no answer in {r['sending_seconds']:.1f} s + 5 s"
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

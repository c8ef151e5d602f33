"""The gateway's benchmark suite: one command, one table (also written as JSON).

    python -m bench.run                       # emulator + gateway (serve.py, production settings)
    python -m bench.run --portkey DIR         # also Portkey (npm @portkey-ai/gateway installed in DIR)
    python -m bench.run --target URL          # load an already running gateway of this API instead
    python -m bench.run --quick               # shorter runs, for a smoke check
    python -m bench.run --only hostile        # just the pathological inputs (also: python -m bench.hostile)

Scenarios (names for --only), each figure the median of --runs runs, after a warm-up:
1. floor: direct calls to the emulator (what no gateway can beat);
   bare: a bare Flask-RESTX resource returning {"ok": true}, no hooks, in its own process under
   waitress with the launcher's settings (bench/bare_restx.py): what the framework itself costs;
   health, notfound, hit1, miss1: the gateway with ONE worker: GET /api/v1/health, a GET that is
   a 404, a cache hit and a cache miss (issue 12's table; with --workers 1 the last two are hit/miss);
2. miss: task requests with unique prompts (emulator delay 0), --workers workers;
3. hit: one prompt repeated (served from the cache), --workers workers;
4. slow: emulator delay 1 s, 200 concurrent clients for --slow-seconds: requests/s against the
   ideal (clients / delay), p99, errors and the server's peak RSS;
5. stream: time to first byte through the gateway's stream endpoint minus direct to the emulator;
6. hostile: the pathological inputs of issue 8 (bench/hostile.py), each against a fresh gateway:
   time per request, /health latency meanwhile, and peak RSS of /stats over a 1,000,000-row ledger.
For 1-3: sequential median and p99 latency; requests/s, median and p99 with 16 clients.
With --portkey: Portkey's miss and slow rows against the same emulator. Under the table, the
ratios issue 12's targets name (hit one worker / bare req/s, miss / Portkey req/s, added
latency against Portkey's, stream added time to first byte, slow upstream share and memory).
Everything binds to 127.0.0.1; every loop is bounded in count or time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

from bench import bare_restx, hostile
from bench.harness import BENCH_KEY, emulator, launcher, quantile, tree_memory_mb
from bench.loadgen import build_post, build_request, run_concurrent, run_sequential, time_to_first_byte
from tests.support.processes import ROOT, free_port, stop, wait_until_up

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "gemini-2.0-flash"
SCENARIOS = ("floor", "bare", "health", "notfound", "hit1", "miss1", "miss", "hit", "stream", "slow", "hostile")
ONE_WORKER = ("health", "notfound", "hit1", "miss1")  # measured on a gateway started with one worker
NOT_FOUND_PATH = "/api/v1/no-such-resource"


# --- what each system is asked ------------------------------------------------------------------

def emulator_request(base: str, stream: bool = False):
    action = "streamGenerateContent?alt=sse" if stream else "generateContent"
    url = f"{base}/v1beta/models/{MODEL}:{action}"
    tag = uuid.uuid4().hex[:8]

    def make(i: int) -> bytes:
        body = {"contents": [{"role": "user", "parts": [{"text": f"floor {tag} {i}"}]}],
                "generationConfig": {"temperature": 0.7}}
        return build_post(url, json.dumps(body).encode(), {"x-goog-api-key": BENCH_KEY})

    return url, make


def gateway_request(base: str, *, repeat: bool = False, stream: bool = False):
    url = f"{base}/api/v1/generate/text" + ("/stream" if stream else "")
    tag = uuid.uuid4().hex[:8]

    def make(i: int) -> bytes:
        prompt = f"bench {tag} repeated prompt" if repeat else f"bench {tag} prompt {i}"
        return build_post(url, json.dumps({"prompt": prompt}).encode())

    return url, make


def get_request(url: str):
    """The same GET every time (health, a 404, the bare resource): built once."""
    request = build_request("GET", url)
    return url, lambda i: request


def portkey_request(base: str, upstream: str, *, stream: bool = False):
    url = f"{base}/v1/chat/completions"
    headers = {"x-portkey-provider": "google", "Authorization": f"Bearer {BENCH_KEY}",
               "x-portkey-custom-host": f"{upstream}/v1beta"}
    tag = uuid.uuid4().hex[:8]

    def make(i: int) -> bytes:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"bench {tag} prompt {i}"}],
                "stream": stream}
        return build_post(url, json.dumps(body).encode(), headers)

    return url, make


# --- measuring ------------------------------------------------------------------------------------

def latency_figures(request, args, expect: int | None = None) -> dict:
    """Sequential median/p99 and 16-client requests/s, median, p99: each the median of --runs runs.

    `expect`: the status that counts as an answer (a 404 row), else any 2xx; others are errors."""
    url, make = request
    run_sequential(url, make, args.warmup, expect)
    runs = []
    for _ in range(args.runs):
        sequential = run_sequential(url, make, args.sequential, expect)
        concurrent = run_concurrent(url, make, args.clients, args.seconds, expect=expect)
        runs.append({
            "seq_median_ms": statistics.median(sequential.latencies_ms),
            "seq_p99_ms": quantile(sequential.latencies_ms, 0.99),
            "rps_16": concurrent.requests_per_second,
            "median_16_ms": statistics.median(concurrent.latencies_ms) if concurrent.latencies_ms else None,
            "p99_16_ms": quantile(concurrent.latencies_ms, 0.99),
            "errors": sequential.errors + concurrent.errors,
        })
    return {key: _median([run[key] for run in runs]) for key in runs[0]}


def slow_figures(request, args, pids: list[int], delay: float) -> dict:
    url, make = request
    runs = []
    for _ in range(args.slow_runs):
        result = run_concurrent(url, make, args.slow_clients, args.slow_seconds, timeout=60)
        runs.append({"rps": result.requests_per_second, "p99_ms": quantile(result.latencies_ms, 0.99),
                     "errors": result.errors})
    figures = {key: _median([run[key] for run in runs]) for key in runs[0]}
    ideal = args.slow_clients / delay
    figures.update(ideal_rps=ideal, share_of_ideal=figures["rps"] / ideal, peak_rss_mb=peak_rss_mb(pids))
    return figures


def ttfb_ms(request, args) -> float:
    url, make = request
    time_to_first_byte(url, make, args.warmup)
    return _median([statistics.median(time_to_first_byte(url, make, args.stream_requests))
                    for _ in range(args.runs)])


def peak_rss_mb(pids: list[int]) -> float | None:
    """Sum of the peak resident memory (VmHWM) of the server's processes and their children (Linux)."""
    figures = [tree_memory_mb(pid) for pid in pids]
    return round(sum(sum(tree.values()) for tree in figures), 1) if figures and all(figures) else None


def _median(values):
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def set_delay(upstream: str, seconds: float) -> None:
    requests.post(f"{upstream}/_emulator/config", json={"reply_delay": seconds}, timeout=5).raise_for_status()


# --- systems under test ---------------------------------------------------------------------------

@contextlib.contextmanager
def our_gateway(upstream: str, args):
    """serve.py with production settings, pointed at the emulator; yields (url, [pid])."""
    with launcher(upstream, workers=args.workers, threads=args.threads) as server:
        yield server.url, [server.process.pid]


@contextlib.contextmanager
def bare_framework(threads: int):
    """bench/bare_restx.py in its own process (the launcher's waitress settings); yields its resource's URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.bare_restx", "--port", str(port), "--threads",
                                str(threads)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}{bare_restx.PATH}"
    try:
        wait_until_up(url, process)
        yield url
    finally:
        stop(process)


@contextlib.contextmanager
def portkey(directory: str):
    port = free_port()
    script = Path(directory) / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    process = subprocess.Popen(["node", str(script), f"--port={port}", "--headless"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "NODE_ENV": "production"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url + "/", process)
        yield url, [process.pid]
    finally:
        stop(process)


# --- the table ------------------------------------------------------------------------------------

def measure(args) -> dict:
    results: dict = {"machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                                 "platform": platform.platform()},
                     "settings": {key: value for key, value in vars(args).items() if key != "target"}}
    wanted = set(args.only.split(",")) if args.only else set(SCENARIOS)
    if args.workers == 1:
        wanted -= {"hit1", "miss1"}  # the hit and miss rows are one worker's already
    with emulator() as upstream:
        if "floor" in wanted:
            results["floor"] = latency_figures(emulator_request(upstream), args)
        if "bare" in wanted:
            with bare_framework(args.threads) as url:
                results["bare"] = latency_figures(get_request(url), args)
        if args.target and wanted & set(ONE_WORKER):
            print("health, notfound, hit1, miss1: skipped with --target (they start a one-worker gateway)")
        elif wanted & set(ONE_WORKER):
            with launcher(upstream, workers=1, threads=args.threads) as server:
                if "health" in wanted:
                    results["health_1w"] = latency_figures(get_request(server.url + "/api/v1/health"), args)
                if "notfound" in wanted:
                    results["notfound_1w"] = latency_figures(get_request(server.url + NOT_FOUND_PATH), args,
                                                             expect=404)
                if "hit1" in wanted:
                    results["hit_1w"] = latency_figures(gateway_request(server.url, repeat=True), args)
                if "miss1" in wanted:
                    results["miss_1w"] = latency_figures(gateway_request(server.url), args)
        if "stream" in wanted:
            results["stream_ttfb_direct_ms"] = ttfb_ms(emulator_request(upstream, stream=True), args)
        if args.target or not wanted & {"miss", "hit", "stream", "slow"}:
            gateway_context = contextlib.nullcontext((args.target, []))
        else:
            gateway_context = our_gateway(upstream, args)
        with gateway_context as (url, pids):
            if "miss" in wanted:
                results["miss"] = latency_figures(gateway_request(url), args)
            if "hit" in wanted:
                results["hit"] = latency_figures(gateway_request(url, repeat=True), args)
            if "stream" in wanted:
                results["stream_ttfb_gateway_ms"] = ttfb_ms(gateway_request(url, stream=True), args)
            if "slow" in wanted:
                set_delay(upstream, args.slow_delay)
                try:
                    results["slow"] = slow_figures(gateway_request(url), args, pids, args.slow_delay)
                finally:
                    set_delay(upstream, 0.0)
        if "hostile" in wanted and args.target:
            print("hostile: skipped with --target (it starts its own gateways, one with a prefilled ledger)")
        elif "hostile" in wanted:
            results["hostile"] = hostile.measure(upstream, args)
        if args.portkey:
            with portkey(args.portkey) as (url, pids):
                results["portkey_miss"] = latency_figures(portkey_request(url, upstream), args)
                set_delay(upstream, args.slow_delay)
                try:
                    results["portkey_slow"] = slow_figures(portkey_request(url, upstream), args, pids,
                                                           args.slow_delay)
                finally:
                    set_delay(upstream, 0.0)
    return results


def _workers(count: int) -> str:
    return f"{count} worker" + ("s" if count != 1 else "")


def latency_rows(results: dict) -> list[tuple[str, str, bool]]:
    """(label, results key, whether 'added' applies: the request reaches the upstream or the cache)."""
    many = _workers(results["settings"]["workers"])
    return [("floor (emulator)", "floor", False), ("bare Flask-RESTX (1 process)", "bare", False),
            ("gateway /health (1 worker)", "health_1w", False), ("gateway 404 (1 worker)", "notfound_1w", False),
            ("gateway hit (1 worker)", "hit_1w", True), ("gateway miss (1 worker)", "miss_1w", True),
            (f"gateway hit ({many})", "hit", True), (f"gateway miss ({many})", "miss", True),
            ("portkey miss (1 process)", "portkey_miss", True)]


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict) -> str:
    floor = results.get("floor", {"seq_median_ms": 0.0})
    rows = [("scenario", "seq p50 ms", "seq p99 ms", "added p50 ms", "rps @16", "p50 @16 ms", "p99 @16 ms", "errors")]

    def latency_row(name, figures, with_added):
        added = figures["seq_median_ms"] - floor["seq_median_ms"] if with_added else None
        rows.append((name, _cell(figures["seq_median_ms"], ".2f"), _cell(figures["seq_p99_ms"], ".2f"),
                     _cell(added, ".2f"), _cell(figures["rps_16"], ".0f"), _cell(figures["median_16_ms"], ".2f"),
                     _cell(figures["p99_16_ms"], ".2f"), _cell(figures["errors"], ".0f")))

    for name, key, with_added in latency_rows(results):
        if key in results:
            latency_row(name, results[key], with_added)
    lines = [_format(rows), ""] if len(rows) > 1 else []
    slow_rows = [("slow upstream (1 s, 200 clients)", "rps", "of ideal", "p99 ms", "errors", "peak RSS MB")]
    for name, key in ((f"gateway ({_workers(results['settings']['workers'])})", "slow"),
                      ("portkey (1 process)", "portkey_slow")):
        if key in results:
            s = results[key]
            slow_rows.append((name, f"{s['rps']:.1f}", f"{s['share_of_ideal']:.1%}", f"{s['p99_ms']:.0f}",
                              f"{s['errors']:.0f}", str(s["peak_rss_mb"])))
    lines += [_format(slow_rows), ""] if len(slow_rows) > 1 else []
    if "stream_ttfb_gateway_ms" in results:
        direct, through = results["stream_ttfb_direct_ms"], results["stream_ttfb_gateway_ms"]
        lines.append(f"stream time to first byte: direct {direct:.2f} ms, through the gateway {through:.2f} ms, "
                     f"added {through - direct:.2f} ms")
    targets = target_lines(results)
    if targets:
        lines += ["", "issue 12's targets (ratios of this run):", *targets, ""]
    if "hostile" in results:
        lines += [hostile.table(results["hostile"]), ""]
    machine = results["machine"]
    medians = any(key in results for key in ("floor", "bare", "health_1w", "miss", "hit", "slow",
                                             "stream_ttfb_gateway_ms"))
    lines.append(f"machine: {machine['cores']} cores, Python {machine['python']}"
                 + (f"; each figure the median of {results['settings']['runs']} runs" if medians else "")
                 + ("; hostile inputs: one run each" if "hostile" in results else ""))
    return "\n".join(lines)


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def target_lines(results: dict) -> list[str]:
    """Issue 12's targets as ratios of this run's rows, each with its goal; only those whose rows ran."""
    workers = results["settings"]["workers"]
    one = {key: results.get(f"{key}_1w", results.get(key) if workers == 1 else None) for key in ("hit", "miss")}
    floor = results.get("floor", {}).get("seq_median_ms")
    lines = []
    bare, hit = results.get("bare"), one["hit"]
    if bare and hit and bare["rps_16"] and hit["rps_16"] is not None:
        ratio = hit["rps_16"] / bare["rps_16"]
        lines.append(f"- cache hit (1 worker) / bare Flask-RESTX, req/s @16: {hit['rps_16']:.0f} / {bare['rps_16']:.0f}"
                     f" = {ratio:.2f} (goal >= 0.6): {_verdict(ratio >= 0.6)}")
    portkey = results.get("portkey_miss")
    misses = [(_workers(1) + ", the launcher's default", one["miss"])]
    if workers != 1:
        misses.append((_workers(workers), results.get("miss")))
    for label, miss in misses:
        if not (portkey and miss and portkey["rps_16"]) or miss["rps_16"] is None:
            continue
        ratio = miss["rps_16"] / portkey["rps_16"]
        lines.append(f"- cache miss ({label}) / Portkey, req/s @16: {miss['rps_16']:.0f} / {portkey['rps_16']:.0f}"
                     f" = {ratio:.2f} (goal >= 1): {_verdict(ratio >= 1)}")
        if floor is not None:
            ours, theirs = miss["seq_median_ms"] - floor, portkey["seq_median_ms"] - floor
            lines.append(f"- cache miss ({label}), sequential added p50: {ours:.2f} ms, Portkey {theirs:.2f} ms, "
                         f"ratio {ours / theirs:.2f} (goal <= 1): {_verdict(ours <= theirs)}"
                         if theirs > 0 else f"- cache miss ({label}), sequential added p50: {ours:.2f} ms, "
                         f"Portkey {theirs:.2f} ms")
    if "stream_ttfb_gateway_ms" in results:
        added = results["stream_ttfb_gateway_ms"] - results["stream_ttfb_direct_ms"]
        lines.append(f"- stream, added time to first byte: {added:.2f} ms (goal < 5 ms): {_verdict(added < 5)}")
    if "slow" in results:
        slow = results["slow"]
        rss = slow["peak_rss_mb"]
        lines.append(f"- slow upstream ({_workers(workers)}): {slow['share_of_ideal']:.1%} of ideal (goal >= 90%): "
                     f"{_verdict(slow['share_of_ideal'] >= 0.9)}; peak RSS {rss} MB (goal < 300 MB): "
                     + (_verdict(rss < 300) if rss is not None else "not measured"))
    return lines


def _format(rows) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).rjust(width) if i else str(cell).ljust(width)
                               for i, (cell, width) in enumerate(zip(row, widths, strict=True))) for row in rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of bench.run (also used by bench/threads.py to measure with the same settings)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="URL of a running gateway of this API (its upstream is not controlled)")
    parser.add_argument("--portkey", help="folder where @portkey-ai/gateway is npm-installed, to measure it too")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=128, help="waitress threads per worker")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--sequential", type=int, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--stream-requests", type=int, default=100)
    parser.add_argument("--slow-clients", type=int, default=200)
    parser.add_argument("--slow-seconds", type=float, default=20.0)
    parser.add_argument("--slow-runs", type=int, default=2)
    parser.add_argument("--slow-delay", type=float, default=1.0)
    parser.add_argument("--only", help="comma-separated scenarios: " + ",".join(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="1 run, short loops: a smoke check, not figures")
    hostile.add_arguments(parser)
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SCENARIOS) if args.only else set()
    if unknown:
        parser.error(f"--only: unknown scenario(s) {', '.join(sorted(unknown))}; known: {', '.join(SCENARIOS)}")
    if args.quick:
        hostile.quick(args)
        args.runs, args.slow_runs, args.seconds, args.sequential, args.slow_seconds = 1, 1, 1.5, 100, 4.0
        args.warmup, args.stream_requests = 30, 30
    if args.target and args.target.endswith("/"):
        args.target = args.target[:-1]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    results = measure(args)
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"(took {results['wall_seconds']} s; JSON in {RESULTS / 'bench.json'})")


if __name__ == "__main__":
    main()

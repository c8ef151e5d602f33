"""The gateway's benchmark suite: one command, one table (also written as JSON).

    python -m bench.run                       # emulator + gateway (serve.py, production settings)
    python -m bench.run --portkey DIR         # also Portkey (npm @portkey-ai/gateway installed in DIR)
    python -m bench.run --target URL          # load an already running gateway of this API instead
    python -m bench.run --quick               # shorter runs, for a smoke check
    python -m bench.run --only hostile        # just the pathological inputs (also: python -m bench.hostile)

Scenarios, each figure the median of --runs runs, after a warm-up:
1. floor: direct calls to the emulator (what no gateway can beat);
2. miss: task requests with unique prompts (emulator delay 0);
3. hit: one prompt repeated (served from the cache);
4. slow: emulator delay 1 s, 200 concurrent clients for --slow-seconds: requests/s against the
   ideal (clients / delay), p99, errors and the server's peak RSS;
5. stream: time to first byte through the gateway's stream endpoint minus direct to the emulator;
6. hostile: the pathological inputs of issue 8 (bench/hostile.py), each against a fresh gateway:
   time per request, /health latency meanwhile, and peak RSS of /stats over a 1,000,000-row ledger.
For 1-3: sequential median and p99 latency; requests/s, median and p99 with 16 clients.
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
import time
import uuid
from pathlib import Path

import requests

from bench import hostile
from bench.harness import BENCH_KEY, emulator, launcher, quantile, tree_memory_mb
from bench.loadgen import build_post, run_concurrent, run_sequential, time_to_first_byte
from tests.support.processes import free_port, stop, wait_until_up

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "gemini-2.0-flash"


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

def latency_figures(request, args) -> dict:
    """Sequential median/p99 and 16-client requests/s, median, p99: each the median of --runs runs."""
    url, make = request
    run_sequential(url, make, args.warmup)
    runs = []
    for _ in range(args.runs):
        sequential = run_sequential(url, make, args.sequential)
        concurrent = run_concurrent(url, make, args.clients, args.seconds)
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
    wanted = set(args.only.split(",")) if args.only else {"floor", "miss", "hit", "stream", "slow", "hostile"}
    with emulator() as upstream:
        if "floor" in wanted:
            results["floor"] = latency_figures(emulator_request(upstream), args)
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


def table(results: dict) -> str:
    floor = results.get("floor", {"seq_median_ms": 0.0})
    rows = [("scenario", "seq p50 ms", "seq p99 ms", "added p50 ms", "rps @16", "p50 @16 ms", "p99 @16 ms", "errors")]

    def latency_row(name, figures):
        added = figures["seq_median_ms"] - floor["seq_median_ms"] if name != "floor (emulator)" else 0.0
        rows.append((name, f"{figures['seq_median_ms']:.2f}", f"{figures['seq_p99_ms']:.2f}", f"{added:.2f}",
                     f"{figures['rps_16']:.0f}", f"{figures['median_16_ms']:.2f}", f"{figures['p99_16_ms']:.2f}",
                     f"{figures['errors']:.0f}"))

    for name, key in (("floor (emulator)", "floor"), ("gateway miss", "miss"), ("gateway hit", "hit"),
                      ("portkey miss", "portkey_miss")):
        if key in results:
            latency_row(name, results[key])
    lines = [_format(rows), ""] if len(rows) > 1 else []
    slow_rows = [("slow upstream (1 s, 200 clients)", "rps", "of ideal", "p99 ms", "errors", "peak RSS MB")]
    for name, key in (("gateway", "slow"), ("portkey", "portkey_slow")):
        if key in results:
            s = results[key]
            slow_rows.append((name, f"{s['rps']:.1f}", f"{s['share_of_ideal']:.1%}", f"{s['p99_ms']:.0f}",
                              f"{s['errors']:.0f}", str(s["peak_rss_mb"])))
    lines += [_format(slow_rows), ""] if len(slow_rows) > 1 else []
    if "stream_ttfb_gateway_ms" in results:
        direct, through = results["stream_ttfb_direct_ms"], results["stream_ttfb_gateway_ms"]
        lines.append(f"stream time to first byte: direct {direct:.2f} ms, through the gateway {through:.2f} ms, "
                     f"added {through - direct:.2f} ms")
    if "hostile" in results:
        lines += [hostile.table(results["hostile"]), ""]
    machine = results["machine"]
    medians = any(key in results for key in ("floor", "miss", "hit", "slow", "stream_ttfb_gateway_ms"))
    lines.append(f"machine: {machine['cores']} cores, Python {machine['python']}"
                 + (f"; each figure the median of {results['settings']['runs']} runs" if medians else "")
                 + ("; hostile inputs: one run each" if "hostile" in results else ""))
    return "\n".join(lines)


def _format(rows) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).rjust(width) if i else str(cell).ljust(width)
                               for i, (cell, width) in enumerate(zip(row, widths, strict=True))) for row in rows)


def main(argv: list[str] | None = None) -> None:
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
    parser.add_argument("--only", help="comma-separated scenarios: floor,miss,hit,stream,slow,hostile")
    parser.add_argument("--quick", action="store_true", help="1 run, short loops: a smoke check, not figures")
    hostile.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        hostile.quick(args)
        args.runs, args.slow_runs, args.seconds, args.sequential, args.slow_seconds = 1, 1, 1.5, 100, 4.0
        args.warmup, args.stream_requests = 30, 30
    if args.target and args.target.endswith("/"):
        args.target = args.target[:-1]
    started = time.monotonic()
    results = measure(args)
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"(took {results['wall_seconds']} s; JSON in {RESULTS / 'bench.json'})")


if __name__ == "__main__":
    main()

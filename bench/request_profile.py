"""Where the gateway's own CPU goes per request, layer by layer, in-process (no sockets, no waitress).

    python -m bench.request_profile [--requests 2000] [--rounds 5] [--top 0] [--only hit|404|health|miss]

Builds the app with `create_app` in production-like settings (APP_ENV=production, limits on with
memory storage and the moving-window strategy, the ledger on a temporary SQLite file, the JSON log
files on, one CORS origin, authentication off as in `bench.harness`), with a Gemini emulator on
loopback in its OWN process (so its CPU is never charged to the gateway). Requests are driven
through the WSGI callable with a raw environ, so no test client's work is counted, in bounded loops.
`hit` repeats one prompt (the first request fills the cache); `miss` sends a new prompt each time,
so every request calls the emulator (checked: upstream calls per request = 1):

- `total`: CPU per request of the whole process (time.process_time: every thread, the log writer
  included) and of the request thread alone (time.thread_time), best of `--rounds` rounds, as the
  machine is shared; and, where the OS gives a thread's CPU clock (Linux), the log writer thread's
  mean over those rounds. A bare Flask-RESTX resource returning {"ok": true} is the reference row.
- the layer table: one cProfile run; each layer is the inclusive profiled time of the functions
  that are that layer, scaled to the unprofiled CPU per request (the profiler inflates every call
  alike, roughly). "framework" is what is left: Werkzeug/Flask/RESTX routing, request and
  response objects, the WSGI call. A miss has its own rows (MISS_ROWS): the provider call, layer
  by layer down to httpx, then the pricing and the cache's store.
- counts per request: rate-limit storage calls (by method), log items queued, ledger commits,
  upstream calls (the emulator's own count).

The log lines' formatting and writing happen on the log writer thread: in `process CPU`, not in
the request thread's figure nor in the layer table (which profiles the request thread only).

Run it with PYTHONPATH pointing at another checkout to measure that code with this profiler
(the base of a before/after comparison): `PYTHONPATH=/tmp/base python -m bench.request_profile`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import pstats
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import app as app_module
from app import create_app
from bench import bare_restx
from bench.harness import emulator
from gateway.config import RATELIMIT_STRATEGIES, Config

KEY = "bench-key-not-a-secret"
BODY = json.dumps({"prompt": "Say hello"}).encode()
ORIGIN = "https://app.example"
APP_FILE = app_module.__file__  # the hooks of app.py, told apart from other modules' functions of the same name

# Each layer: (name, [(file fragment, function name)...]); times are inclusive (cumtime), so a layer
# lists functions that do not call one another, and no function of one layer calls another layer's.
# Where one does, `minus` below takes the inner layers out of the outer one.
LAYERS: list[tuple[str, list[tuple[str, str]]]] = [
    ("request state + request id (start_request)", [(APP_FILE, "start_request")]),
    ("security scan", [(APP_FILE, "_scan_request")]),
    ("limiter: checks (its before_request + the task limit)", [("flask_limiter/_extension.py",
                                                              "_check_request_limit")]),
    ("limiter: headers (after_request)", [("flask_limiter/_extension.py", "__inject_headers")]),
    ("task resource (read, validate, options, answer)", [("task_routes.py", "post")]),
    ("  of which schema validation", [("gateway/http/schemas.py", "validate")]),
    ("  of which service.run (cache lookup)", [("gateway/tasks/service.py", "run")]),
    ("after_request: finish_request", [(APP_FILE, "finish_request")]),
    ("  of which request_info", [("gateway/http/routes.py", "request_info")]),
    ("  of which ledger commit (tracker.record, no log)", [("cost_tracker.py", "_commit")]),
    ("  of which log lines (log_finished: the queue put)", [("enhanced_logging.py", "log_finished")]),
    ("  of which counters", [("observability/metrics.py", "count_request")]),
    ("  of which cost headers", [(APP_FILE, "_add_cost_headers")]),
    ("security headers", [("security_headers.py", "add_security_headers")]),
    ("CORS (flask-cors after_request)", [("flask_cors/extension.py", "cors_after_request")]),
    ("budget teardown", [(APP_FILE, "release_budget")]),
    ("error mapping (404)", [(APP_FILE, "api_error"), (APP_FILE, "flask_error")]),
    ("JSON encoding (RESTX output_json)", [("flask_restx/representations.py", "output_json")]),
]
# The same request layers, and the cache miss's own below the task resource: the provider call from
# the service's compute down to httpx, each "of which" a part of the row above it.
_AFTER_SERVICE = next(index for index, (name, _) in enumerate(LAYERS) if "service.run" in name) + 1
MISS_ROWS: list[tuple[str, list[tuple[str, str]]]] = [
    *LAYERS[:_AFTER_SERVICE],
    ("    of which the miss: prompt, provider call, parse, price", [("gateway/tasks/service.py", "compute")]),
    ("      of which fallback chain + retry policy + provider", [("gateway/providers/router.py", "complete")]),
    ("        of which retry policy run", [("gateway/providers/retry_policy.py", "run")]),
    ("        of which GeminiProvider.complete", [("gemini_wrapper.py", "complete")]),
    ("          of which request body (_body)", [("gemini_wrapper.py", "_body")]),
    ("          of which SDK request() (old path)", [("google/genai/_api_client.py", "request")]),
    ("          of which SDK _request_once", [("google/genai/_api_client.py", "_request_once")]),
    ("            of which httpx build_request", [("httpx/_client.py", "build_request")]),
    ("            of which httpx send (the exchange)", [("httpx/_client.py", "send")]),
    ("            of which APIError.raise_for_response", [("google/genai/errors.py", "raise_for_response")]),
    ("          of which reply JSON + check (read_reply)", [("gateway/providers/gemini_replies.py", "read_reply")]),
    ("      of which parse + price (_parsed_answer)", [("gateway/tasks/service.py", "_parsed_answer")]),
    ("    of which cache store (LRUCache.put)", [("lru_cache.py", "put")]),
    *LAYERS[_AFTER_SERVICE:],
]
# Layers that contain other layers: the outer figure shown is net of these.
NESTED = {
    "request state + request id (start_request)": ["security scan"],
}


def gateway_app(workdir: Path, base_url: str, strategy: str = "moving-window"):
    config = Config.load({}, app_env="production", google_api_key=KEY, gemini_base_url=base_url,
                         ratelimit_strategy=strategy, ratelimit_task_limits="10000000 per minute", log_console=False,
                         auth_enabled=False, auth_allow_anonymous=True, cors_origins=(ORIGIN,),
                         log_dir=workdir / "logs", cost_ledger_path=workdir / "ledger.sqlite3")
    return create_app(config)


def environ(method: str, path: str, body: bytes = b"") -> dict:
    """A WSGI environ as waitress builds it (the fields Flask reads), without a test client."""
    return {
        "REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path, "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8081", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "50000", "HTTP_HOST": "127.0.0.1:8081",
        "HTTP_USER_AGENT": "bench/1", "HTTP_ACCEPT": "*/*", "HTTP_CONNECTION": "keep-alive",
        "CONTENT_TYPE": "application/json" if body else "", "CONTENT_LENGTH": str(len(body)) if body else "",
        "wsgi.url_scheme": "http", "wsgi.version": (1, 0), "wsgi.multithread": True,
        "wsgi.multiprocess": False, "wsgi.run_once": False, "wsgi.errors": sys.stderr, "_body": body,
    }


def caller(app, template: dict, expect: int, bodies: Iterator[bytes] | None = None):
    """A function making one request through `app`'s WSGI callable; checks the status.
    `bodies`: a new body for each call (a cache miss each time), instead of the template's."""
    statuses = []

    def start_response(status, headers, exc_info=None):
        statuses.append(status)

    def call():
        env = dict(template)
        body = template["_body"] if bodies is None else next(bodies)
        env["CONTENT_LENGTH"] = str(len(body)) if body else ""
        env["wsgi.input"] = io.BytesIO(body)
        result = app(env, start_response)
        b"".join(result)
        if hasattr(result, "close"):
            result.close()
        status = statuses.pop()
        if not status.startswith(str(expect)):
            raise SystemExit(f"{template['PATH_INFO']}: expected {expect}, got {status}")

    return call


def cpu_per_request(call, requests: int, rounds: int) -> tuple[float, float]:
    """(process CPU µs, request-thread CPU µs) per request, each the best of `rounds`."""
    for _ in range(min(200, requests)):
        call()
    process, thread = [], []
    for _ in range(rounds):
        p0, t0 = time.process_time(), time.thread_time()
        for _ in range(requests):
            call()
        thread.append((time.thread_time() - t0) * 1e6 / requests)
        process.append((time.process_time() - p0) * 1e6 / requests)
    return min(process), min(thread)


def writer_cpu(app):
    """A function giving the log writer thread's CPU seconds so far (Linux: its own clock), or None
    (no such clock, or code without the log writer thread: an older checkout measured for a base)."""
    writer = getattr(app.extensions["gateway"].logger, "_writer", None)
    thread = getattr(writer, "_thread", None)
    if thread is None or not hasattr(time, "pthread_getcpuclockid"):
        return None
    clock = time.pthread_getcpuclockid(thread.ident)
    return lambda: time.clock_gettime(clock)


def profile_layers(call, requests: int, top: int, layers: list[tuple[str, list[tuple[str, str]]]] = LAYERS,
                   ) -> tuple[dict[str, float], dict[str, float]]:
    """{layer: fraction of the profiled time} and {package: fraction of own time}; prints the `top` functions."""
    profiler = cProfile.Profile(time.thread_time)  # CPU of this thread: waits (a thread start) are not cost
    profiler.enable()
    for _ in range(requests):
        call()
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in stats.stats.values())
    found = {}
    for name, functions in layers:
        cum = 0.0
        for (filename, _line, function), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
            if any(function == wanted and (filename == fragment if fragment is APP_FILE else fragment in filename)
                   for fragment, wanted in functions):
                cum += ct
        found[name] = cum
    for outer, inner in NESTED.items():
        found[outer] -= sum(found[name] for name in inner)
    if top:
        stats.sort_stats("tottime").print_stats(top)
    return {name: cum / total for name, cum in found.items()}, package_split(stats, total)


ROOT = str(Path(app_module.__file__).resolve().parent)


def package_split(stats: pstats.Stats, total: float) -> dict[str, float]:
    """Own time (tottime) by package, largest first: whose code the CPU runs in. A C function
    (a builtin, a C method) is charged to the package of the Python function that called it."""
    shares: Counter = Counter()
    for (filename, _line, _function), (_cc, _nc, tottime, _ct, callers) in stats.stats.items():
        if filename != "~":
            shares[_package_of(filename)] += tottime
            continue
        called = sum(caller_time for (_n, _p, caller_time, _c) in callers.values()) or 1.0
        for (caller_file, _l, _f), (_n, _p, caller_time, _c) in callers.items():
            shares[_package_of(caller_file)] += tottime * caller_time / called
    return {name: share / total for name, share in shares.most_common()}


def _commit_of(folder: str) -> str:
    """The checkout's commit (and "+changes" if its tree differs), so a before/after run says what it ran."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "?") + ("+changes" if git("status", "--porcelain", "-uno") else "")


def _package_of(filename: str) -> str:
    """`flask_limiter` for a site-packages file, `gateway (own code)` for this project's, `stdlib` otherwise."""
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if filename.startswith(ROOT) and "/.venv/" not in filename:
        return "gateway (own code)"
    return "stdlib" if filename.startswith("/") else "C (called from C)"


class Counts:
    """Per-request counts: rate-limit storage calls, log items queued, ledger commits."""

    def __init__(self, app, upstream_url: str):
        self.counter: Counter = Counter()
        self.upstream_url = upstream_url
        gateway = app.extensions["gateway"]
        storage = app.extensions["rate_limiter"].storage
        for method in ("incr", "get", "get_expiry", "acquire_entry", "get_moving_window",
                       "acquire_sliding_window_entry", "get_sliding_window", "clear"):
            self._wrap(storage, method, f"limiter storage {method}")
        self._wrap(gateway.logger, "_put", "log items queued")  # what every log_* call queues
        self._wrap(gateway.tracker, "_commit", "ledger commits")
        self._wrap(threading.Thread, "start", "threads started (limits' memory storage expiry timer)")

    def _wrap(self, owner, method: str, label: str) -> None:
        original = getattr(owner, method, None)
        if original is None:
            return

        def counted(*args, **kwargs):
            self.counter[label] += 1
            return original(*args, **kwargs)

        setattr(owner, method, counted)

    def per_request(self, call, requests: int) -> dict[str, float]:
        self.counter.clear()
        upstream_before = self.upstream_calls()
        for _ in range(requests):
            call()
        self.counter["upstream calls (the emulator's count)"] = self.upstream_calls() - upstream_before
        return {label: count / requests for label, count in sorted(self.counter.items())}

    def upstream_calls(self) -> int:
        with urllib.request.urlopen(self.upstream_url + "/_emulator/stats", timeout=10) as reply:
            return json.load(reply)["request_count"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--top", type=int, default=0, help="also print the top N functions by own time")
    parser.add_argument("--only", choices=["hit", "404", "health", "miss"], action="append",
                        help="profile only these cases (repeatable); miss is left out unless named")
    parser.add_argument("--strategy", choices=RATELIMIT_STRATEGIES, default="moving-window",
                        help="Flask-Limiter's strategy (RATELIMIT_STRATEGY; the default is the gateway's)")
    args = parser.parse_args()
    with emulator() as base_url:  # its own process: its CPU is not the gateway's
        profile(args, base_url)


def profile(args, base_url: str) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="request-profile-"))
    app = gateway_app(workdir, base_url, args.strategy)
    cases = {
        "hit": caller(app, environ("POST", "/api/v1/generate/text", BODY), 200),
        "404": caller(app, environ("GET", "/api/v1/no-such-path"), 404),
        "health": caller(app, environ("GET", "/api/v1/health"), 200),
        # a new prompt each call (the counter's cost is counted)
        "miss": caller(app, environ("POST", "/api/v1/generate/text", BODY), 200,
                       bodies=(b'{"prompt": "Say hello %d"}' % number for number in itertools.count())),
    }
    wanted = args.only or ["hit", "404", "health"]  # a miss runs only when asked: it is slow and calls upstream
    caller(app, environ("POST", "/api/v1/generate/text", BODY), 200)()  # the miss that fills the cache
    bare = caller(bare_restx.create_app(), environ("GET", bare_restx.PATH), 200)
    bare_process, bare_thread = cpu_per_request(bare, args.requests, args.rounds)
    print(f"code measured: {ROOT} (git {_commit_of(ROOT)}); rate-limit strategy: {args.strategy}")
    print(f"bare Flask-RESTX resource: {bare_process:7.1f} µs process CPU, {bare_thread:7.1f} µs request thread")
    counts = Counts(app, base_url)
    for name, call in cases.items():
        if name not in wanted:
            continue
        writer = writer_cpu(app)
        writer_start = writer() if writer else 0.0
        process, thread = cpu_per_request(call, args.requests, args.rounds)
        writer_note = ""
        if writer:
            app.extensions["gateway"].logger.flush()  # what these requests queued, written
            made = min(200, args.requests) + args.rounds * args.requests
            writer_note = f", log writer thread {(writer() - writer_start) * 1e6 / made:5.1f} µs (mean)"
        fractions, packages = profile_layers(call, args.requests, args.top, MISS_ROWS if name == "miss" else LAYERS)
        print(f"\n== {name}: {process:7.1f} µs process CPU per request ({thread:7.1f} µs request thread"
              f"{writer_note}); bare/{name} = {bare_process / process:.2f}")
        shown = 0.0
        for layer, fraction in fractions.items():
            if fraction * process < 0.5:
                continue
            print(f"  {layer:<60} {fraction * process:7.1f} µs")
            if not layer.startswith("  "):
                shown += fraction * process
        print(f"  {'framework + WSGI + the rest':<60} {process - shown:7.1f} µs")
        print("  own CPU by package: " + ", ".join(
            f"{name} {share * process:.0f} µs" for name, share in packages.items() if share * process >= 5))
        for label, per in counts.per_request(call, min(args.requests, 500)).items():
            print(f"  per request: {label} = {per:g}")
    app.extensions["gateway"].close()


if __name__ == "__main__":
    main()

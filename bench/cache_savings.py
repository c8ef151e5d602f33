"""Replay a workload where 40% of requests repeat earlier prompts; report the cost saved.

    python -m bench.cache_savings [--requests 400] [--repeat 0.4] [--delay 0.0]

Starts the emulator and the gateway (waitress, production settings) on loopback, sends the
workload, then reads `/api/v1/stats`: the cost reduction the cache achieved, and the median
server-side latency (X-Response-Time-ms) of cache hits and misses. Prints a table and writes
bench/results/cache_savings.json. The prompts, tasks and repeats come from a fixed seed.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import requests

from bench.harness import emulator, gateway, median, quantile

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = [
    ("/api/v1/generate/text", lambda n: {"prompt": f"Write a paragraph about topic number {n} for a newsletter"}),
    ("/api/v1/generate/code", lambda n: {"prompt": f"Write a function that computes series number {n}"}),
    ("/api/v1/classify/text", lambda n: {"text": f"Customer message {n}: the product is great",
                                         "categories": ["positive", "negative", "neutral"]}),
]


def workload(total: int, repeat_share: float, seed: int = 7) -> list[tuple[str, dict]]:
    """`total` requests; each one past the first repeats an earlier request with `repeat_share` odds."""
    rng = random.Random(seed)
    sent: list[tuple[str, dict]] = []
    for n in range(total):
        if sent and rng.random() < repeat_share:
            sent.append(rng.choice(sent))
        else:
            path, make = TASKS[n % len(TASKS)]
            sent.append((path, make(n)))
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--repeat", type=float, default=0.4, help="share of requests that repeat an earlier one")
    parser.add_argument("--delay", type=float, default=0.0, help="emulator reply delay in seconds")
    args = parser.parse_args()

    requests_to_send = workload(args.requests, args.repeat)
    with emulator(args.delay) as upstream, gateway(upstream) as (url, _):
        http = requests.Session()
        hit_ms, miss_ms, hits = [], [], 0
        for path, payload in requests_to_send:
            response = http.post(url + path, json=payload, timeout=60)
            response.raise_for_status()
            server_ms = float(response.headers["X-Response-Time-ms"])
            if response.headers["X-Cached"] == "true":
                hits += 1
                hit_ms.append(server_ms)
            else:
                miss_ms.append(server_ms)
        usage = http.get(url + "/api/v1/stats", params={"hours": 1}, timeout=10).json()["usage"]

    result = {
        "requests": args.requests,
        "repeat_share_target": args.repeat,
        "cache_hits": hits,
        "cost_spent_usd": usage["cost"]["total"],
        "cost_saved_usd": usage["cost_saved_by_cache"],
        "cost_without_cache_usd": usage["cost_without_cache"],
        "cost_reduction": usage["cost_reduction"],
        "server_ms_cache_hit_median": round(median(hit_ms), 3),
        "server_ms_cache_hit_p99": round(quantile(hit_ms, 0.99), 3),
        "server_ms_cache_miss_median": round(median(miss_ms), 3),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cache_savings.json").write_text(json.dumps(result, indent=2))
    width = max(len(key) for key in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(f"\ncost reduction from the cache: {usage['cost_reduction']:.1%} "
          f"({hits} of {args.requests} requests were cache hits)")


if __name__ == "__main__":
    main()

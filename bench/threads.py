"""What the waitress thread count per worker costs (issue 12, "thread count and waitress settings").

    python -m bench.threads                                   # the defaults below, about 10 minutes
    python -m bench.threads --threads 128,16 --slow-threads 128,100 --repeats 2

Two questions, each through the production launcher (serve.py) with bench.run's scenarios:
- hit and miss with ONE worker (bench.run's hit1 and miss1: sequential p50, req/s at 16
  keep-alive clients) at each of --threads: do fewer threads contend less for the GIL?
- the slow upstream (1 s replies, 200 clients) with TWO workers at each of --slow-threads: which
  thread count still keeps the share of ideal at >= 90%? (each in-flight call holds a thread).
Settings alternate within each round (128, 32, 16, 8, 128, 32, ...) so a drift in the shared
machine's speed falls on all of them alike; each figure printed is the median over --repeats
rounds, every round itself bench.run's median of its --runs runs. Loopback only, bounded loops.
Anything after `--` goes to bench.run's command line (e.g. `-- --runs 1 --seconds 3`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from bench import run

HIT_MISS = (("hit_1w", "hit"), ("miss_1w", "miss"))


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def measure(threads: list[int], slow_threads: list[int], repeats: int, extra: list[str]) -> dict:
    rounds: dict = {"hit_miss": {n: [] for n in threads}, "slow": {n: [] for n in slow_threads}}
    for repeat in range(repeats):
        for n in threads:
            args = run.parse_args(["--workers", "2", "--threads", str(n), "--only", "hit1,miss1", *extra])
            print(f"round {repeat + 1}: hit1,miss1 at {n} threads", file=sys.stderr, flush=True)
            rounds["hit_miss"][n].append(run.measure(args))
    for repeat in range(repeats):
        for n in slow_threads:
            args = run.parse_args(["--workers", "2", "--threads", str(n), "--only", "slow", "--slow-runs", "1",
                                   *extra])
            print(f"round {repeat + 1}: slow at 2 workers x {n} threads", file=sys.stderr, flush=True)
            rounds["slow"][n].append(run.measure(args)["slow"])
    return rounds


def _median(values: list[float]) -> float:
    return statistics.median(values)


def table(rounds: dict) -> str:
    lines = ["threads/worker (1 worker) | hit seq p50 ms | hit req/s @16 | miss seq p50 ms | miss req/s @16 | errors"]
    for n, results in rounds["hit_miss"].items():
        cells = []
        for key, _ in HIT_MISS:
            seq = [r[key]["seq_median_ms"] for r in results]
            rps = [r[key]["rps_16"] for r in results]
            cells += [f"{_median(seq):.2f} ({', '.join(f'{v:.2f}' for v in seq)})",
                      f"{_median(rps):.0f} ({', '.join(f'{v:.0f}' for v in rps)})"]
        errors = sum(r[key]["errors"] for r in results for key, _ in HIT_MISS)
        lines.append(f"{n} | " + " | ".join(cells) + f" | {errors:.0f}")
    lines += ["", "threads/worker (2 workers, capacity) | slow req/s | share of ideal | p99 ms | errors | peak RSS MB"]
    for n, results in rounds["slow"].items():
        share = [r["share_of_ideal"] for r in results]
        lines.append(f"{n} ({2 * n}) | {_median([r['rps'] for r in results]):.1f} | "
                     f"{_median(share):.1%} ({', '.join(f'{v:.1%}' for v in share)}) | "
                     f"{_median([r['p99_ms'] for r in results]):.0f} | {sum(r['errors'] for r in results):.0f} | "
                     f"{_median([r['peak_rss_mb'] for r in results if r['peak_rss_mb'] is not None] or [0])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=_ints, default=[128, 32, 16, 8], help="hit/miss settings, 1 worker")
    parser.add_argument("--slow-threads", type=_ints, default=[128, 64, 32], help="slow settings, 2 workers")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    started = time.monotonic()
    rounds = measure(args.threads, args.slow_threads, args.repeats, extra)
    run.RESULTS.mkdir(exist_ok=True)
    (run.RESULTS / "threads.json").write_text(json.dumps(rounds, indent=2))
    print(table(rounds))
    print(f"(took {time.monotonic() - started:.0f} s; JSON in {run.RESULTS / 'threads.json'})")


if __name__ == "__main__":
    main()

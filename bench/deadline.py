"""What the whole-exchange deadline (`upstream_deadline.DeadlineTransport`) costs per upstream call.

    python -m bench.deadline [--calls 300] [--rounds 5]

A/B in one process against the emulator (its own process, loopback), rounds interleaved so both
sides see the same machine: one generateContent call through raw httpx with httpx's own
transport vs with the deadline transport, and `GeminiClient.generate_text` (a cache miss's
upstream part) with the deadline transport vs the same client with it unwrapped. Figures: the
best round's CPU per call of this thread (steadier than wall time on a shared machine) and the
median wall time.
"""

from __future__ import annotations

import argparse
import json

import httpx

from bench.harness import emulator
from bench.layers import KEY, MODEL, timed
from gateway.providers import deadline as upstream_deadline
from gemini_wrapper import GeminiClient


def _unwrapped(client: GeminiClient) -> GeminiClient:
    """The same client sending through httpx's plain transport (as before the deadline transport)."""
    for api in client._transports:
        deadline_transport = api._httpx_client._transport
        pool = deadline_transport.inner._pool
        pool._network_backend = pool._network_backend._backend
        api._httpx_client._transport = deadline_transport.inner
    return client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with emulator() as base_url:
        url = f"{base_url}/v1beta/models/{MODEL}:generateContent"
        body = json.dumps({"contents": [{"role": "user", "parts": [{"text": "Say hello"}]}]})
        headers = {"x-goog-api-key": KEY, "content-type": "application/json"}
        plain = httpx.Client(timeout=30)
        bounded = httpx.Client(timeout=30, transport=upstream_deadline.build_transport(
            base_url=base_url, max_connections=10, verify=True))
        unwrapped = _unwrapped(GeminiClient(api_key=KEY, model=MODEL, base_url=base_url, pool_shards=1))
        wrapped = GeminiClient(api_key=KEY, model=MODEL, base_url=base_url, pool_shards=1)
        pairs = {
            "raw httpx POST": (lambda: plain.post(url, content=body, headers=headers),
                               lambda: bounded.post(url, content=body, headers=headers)),
            "GeminiClient.generate_text": (lambda: unwrapped.generate_text("Say hello"),
                                           lambda: wrapped.generate_text("Say hello")),
        }
        print(f"{'call':<28} {'without (wall / CPU)':>22} {'with deadline':>22} {'CPU added':>11}")
        for name, (without, with_deadline) in pairs.items():
            a, b = [], []
            for _ in range(args.rounds):  # interleaved, so both sides share the machine's mood
                a.append(timed(without, args.calls, 1))
                b.append(timed(with_deadline, args.calls, 1))
            (wall_a, cpu_a), (wall_b, cpu_b) = min(a, key=lambda r: r[1]), min(b, key=lambda r: r[1])
            print(f"{name:<28} {wall_a:8.3f} / {cpu_a:.3f} ms {wall_b:8.3f} / {cpu_b:.3f} ms "
                  f"{(cpu_b - cpu_a) * 1000:8.1f} us")


if __name__ == "__main__":
    main()

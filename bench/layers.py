"""What each integration layer costs per call, single-threaded, against the emulator on loopback.

    python -m bench.layers [--calls 300]

Measures one generateContent round trip (wall time, and the CPU this process spends, which
is steadier on a shared machine) through: raw httpx, the google-genai SDK's transport and its
typed `generate_content`,
LangChain's `ChatGoogleGenerativeAI.invoke`, and the gateway's own `GeminiClient` (which
adds retries, the deadline and error translation). The emulator runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx
from google import genai
from google.genai import types
from langchain_google_genai import ChatGoogleGenerativeAI

from bench.harness import emulator
from gemini_wrapper import GeminiClient

MODEL = "gemini-2.0-flash"
KEY = "bench-key-not-a-secret"


def timed(call, calls: int, rounds: int = 3) -> tuple[float, float]:
    """(wall ms median, CPU ms per call of this thread): best of `rounds`, as the machine is shared."""
    for _ in range(20):
        call()
    walls, cpus = [], []
    for _ in range(rounds):
        samples, cpu_started = [], time.thread_time()
        for _ in range(calls):
            started = time.perf_counter()
            call()
            samples.append((time.perf_counter() - started) * 1000)
        cpus.append((time.thread_time() - cpu_started) * 1000 / calls)
        walls.append(statistics.median(samples))
    return min(walls), min(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    with emulator() as base_url:
        body = {"contents": [{"role": "user", "parts": [{"text": "Say hello"}]}],
                "generationConfig": {"temperature": 0.7}}
        raw = httpx.Client()
        url = f"{base_url}/v1beta/models/{MODEL}:generateContent"
        sdk = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=base_url))
        chat = ChatGoogleGenerativeAI(model=MODEL, google_api_key=KEY, base_url=base_url, max_retries=1,
                                      temperature=0.7)
        gateway_client = GeminiClient(api_key=KEY, model=MODEL, base_url=base_url)
        rows = {
            "raw httpx POST": lambda: raw.post(url, content=json.dumps(body),
                                               headers={"x-goog-api-key": KEY, "content-type": "application/json"}),
            "google-genai generate_content": lambda: sdk.models.generate_content(
                model=MODEL, contents="Say hello", config=types.GenerateContentConfig(temperature=0.7)),
            "google-genai transport request": lambda: json.loads(sdk._api_client.request(
                "post", f"models/{MODEL}:generateContent", body, {"timeout": 30000}).body),
            "LangChain invoke": lambda: chat.invoke("Say hello"),
            "GeminiClient.generate_text": lambda: gateway_client.generate_text("Say hello"),
        }
        print(f"{'layer':<32} {'wall median':>12} {'CPU per call':>13}")
        for name, call in rows.items():
            wall, cpu = timed(call, args.calls)
            print(f"{name:<32} {wall:9.3f} ms {cpu:10.3f} ms")


if __name__ == "__main__":
    main()

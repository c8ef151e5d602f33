"""What each integration layer costs per generateContent call, single-threaded, against the emulator.

    python -m bench.layers [--calls 300] [--rounds 5]

One generateContent round trip through each layer, from the bottom up: raw httpx; the
google-genai SDK's `_request_once` with a request built once (what the gateway's provider sends
through, `gateway/providers/gemini_transport.py`); the SDK's `request()` (builds the request and
enters its tenacity per call); its typed `models.generate_content`; LangChain's
`ChatGoogleGenerativeAI.invoke`; the gateway's `GeminiProvider.complete` (one attempt: body,
the SDK's prebuilt request, reply check); and `GeminiClient.generate_text` (adds the task
prompt, the router, the retry policy and the parser). The emulator runs in its own process, so
only the caller's work is measured: CPU of the calling thread per call (steadier on a shared
machine) and wall time per call, each the median over `--rounds` rounds.
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
from gateway.providers.base import GenerationParams, user_prompt
from gemini_wrapper import GeminiClient, GeminiProvider

MODEL = "gemini-2.0-flash"
KEY = "bench-key-not-a-secret"
BODY = {"contents": [{"role": "user", "parts": [{"text": "Say hello"}]}], "generationConfig": {"temperature": 0.7}}


def timed(call, calls: int, rounds: int) -> tuple[float, float]:
    """(wall ms per call, CPU ms per call of this thread), each the median of `rounds` rounds."""
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
    return statistics.median(walls), statistics.median(cpus)


def rows(base_url: str) -> dict:
    """{layer: one call through it}; every call sends the same prompt and temperature."""
    raw = httpx.Client()
    url = f"{base_url}/v1beta/models/{MODEL}:generateContent"
    raw_headers = {"x-goog-api-key": KEY, "content-type": "application/json"}
    sdk = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=base_url))
    api = sdk._api_client
    prebuilt = api._build_request("post", f"models/{MODEL}:generateContent", dict(BODY), {"timeout": 30000})
    chat = ChatGoogleGenerativeAI(model=MODEL, google_api_key=KEY, base_url=base_url, max_retries=1, temperature=0.7)
    provider = GeminiProvider(api_key=KEY, base_url=base_url, pool_shards=1, model=MODEL)
    request = user_prompt("Say hello", GenerationParams(temperature=0.7), model=MODEL)
    gateway_client = GeminiClient(api_key=KEY, model=MODEL, base_url=base_url, pool_shards=1)
    return {
        "raw httpx POST": lambda: json.loads(raw.post(url, content=json.dumps(BODY), headers=raw_headers).text),
        "SDK _request_once (prebuilt request)": lambda: json.loads(api._request_once(prebuilt).response_stream[0]),
        "SDK request()": lambda: json.loads(api.request(
            "post", f"models/{MODEL}:generateContent", dict(BODY), {"timeout": 30000}).body),
        "SDK models.generate_content": lambda: sdk.models.generate_content(
            model=MODEL, contents="Say hello", config=types.GenerateContentConfig(temperature=0.7)),
        "LangChain invoke": lambda: chat.invoke("Say hello"),
        "GeminiProvider.complete (gateway)": lambda: provider.complete(request, 30.0),
        "GeminiClient.generate_text (+retry, task)": lambda: gateway_client.generate_text("Say hello"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with emulator() as base_url:
        print(f"{'layer (one generateContent call)':<44} {'wall median':>12} {'CPU per call':>13}")
        for name, call in rows(base_url).items():
            wall, cpu = timed(call, args.calls, args.rounds)
            print(f"{name:<44} {wall:9.3f} ms {cpu:10.3f} ms")


if __name__ == "__main__":
    main()

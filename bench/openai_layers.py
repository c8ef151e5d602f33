"""What each layer of the openai SDK costs per chat completion, single-threaded, on loopback.

    python -m bench.openai_layers [--calls 300]

The OpenAI-compatible emulator runs in its own process; the figures are the wall median and
the CPU this thread spends per call (steadier on a shared machine), best of 3 rounds, through:
bare httpx2, the SDK client's `post(cast_to=httpx2.Response)` (the provider's hot path),
`chat.completions.with_raw_response.create`, `chat.completions.create`, LangChain's
`ChatOpenAI.invoke`, and the gateway's `OpenAICompatProvider.complete` (post plus the deadline
transport, reply checks and error translation).
"""

from __future__ import annotations

import argparse
import contextlib
import json

import httpx2
from langchain_openai import ChatOpenAI

from bench.layers import timed
from gateway.providers.base import GenerationParams, Message, ProviderRequest
from gateway.providers.openai_compat import OpenAICompatProvider
from tests.support.emulators import emulator_process

MODEL = "gpt-4o-mini"
KEY = "bench-key-not-a-secret"


@contextlib.contextmanager
def openai_emulator():
    """An OpenAI-compatible emulator process; yields its base URL (ending in /v1)."""
    with emulator_process(provider="openai") as url:
        yield url + "/v1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    body = {"model": MODEL, "messages": messages, "temperature": 0.7}
    with openai_emulator() as base_url:
        raw = httpx2.Client()
        chat = ChatOpenAI(model=MODEL, api_key=KEY, base_url=base_url, max_retries=0, temperature=0.7,
                          http_client=httpx2.Client())
        client = chat.root_client
        provider = OpenAICompatProvider(api_key=KEY, base_url=base_url, pool_shards=1)
        request = ProviderRequest(MODEL, (Message("system", "Be brief."), Message("user", "Say hello")),
                                  GenerationParams(temperature=0.7))
        rows = {
            "bare httpx2 POST": lambda: json.loads(raw.post(
                f"{base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}).content),
            "SDK post(cast_to=Response)": lambda: json.loads(client.post(
                "/chat/completions", body=body, cast_to=httpx2.Response, options={"timeout": 30.0}).content),
            "SDK with_raw_response.create": lambda: json.loads(client.chat.completions.with_raw_response.create(
                model=MODEL, messages=messages, temperature=0.7, timeout=30.0).http_response.content),
            "SDK chat.completions.create": lambda: client.chat.completions.create(
                model=MODEL, messages=messages, temperature=0.7, timeout=30.0),
            "LangChain ChatOpenAI.invoke": lambda: chat.invoke([("system", "Be brief."), ("human", "Say hello")]),
            "OpenAICompatProvider.complete": lambda: provider.complete(request, 30.0),
        }
        print(f"{'layer':<32} {'wall median':>12} {'CPU per call':>13}")
        for name, call in rows.items():
            wall, cpu = timed(call, args.calls)
            print(f"{name:<32} {wall:9.3f} ms {cpu:10.3f} ms")
        provider.close()


if __name__ == "__main__":
    main()

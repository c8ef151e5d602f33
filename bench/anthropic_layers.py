"""What each Anthropic integration layer costs per call, single-threaded, against the emulator.

    python -m bench.anthropic_layers [--calls 300]

The numbers behind `gateway.providers.anthropic`'s choice of hot path: one Messages round trip
through bare httpx2, the SDK client's `post` (raw response), its typed `messages.create`,
LangChain's `ChatAnthropic.invoke`, and the provider's `complete`; then a stream through the
SDK's typed events and through the provider. The emulator runs in its own process, so the CPU
column is this client's alone.
"""

from __future__ import annotations

import argparse

import httpx2
from langchain_anthropic import ChatAnthropic

from bench.layers import timed
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import GenerationParams, Message, ProviderRequest
from tests.support.emulators import emulator_process

MODEL = "claude-bench"
KEY = "bench-key-not-a-secret"
PROMPT = "Write a haiku about the sea"


def anthropic_emulator():
    """An Anthropic emulator process; yields its base URL."""
    return emulator_process(provider="anthropic")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    with anthropic_emulator() as base_url:
        body = {"model": MODEL, "max_tokens": 256, "system": "Be brief.",
                "messages": [{"role": "user", "content": PROMPT}]}
        raw = httpx2.Client(base_url=base_url, headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
        chat = ChatAnthropic(model=MODEL, api_key=KEY, base_url=base_url, max_retries=0, max_tokens=256)
        sdk = chat._client
        provider = AnthropicProvider(api_key=KEY, base_url=base_url)
        request = ProviderRequest(MODEL, (Message("system", "Be brief."), Message("user", PROMPT)),
                                  GenerationParams(max_tokens=256))
        rows = {
            "raw httpx2 POST": lambda: raw.post("/v1/messages", json=body).json(),
            "SDK client.post (raw)": lambda: sdk.post("/v1/messages", body=body, cast_to=httpx2.Response,
                                                      options={"timeout": 30}).json(),
            "SDK messages.create": lambda: sdk.messages.create(**body, timeout=30),
            "LangChain invoke": lambda: chat.invoke([("system", "Be brief."), ("user", PROMPT)]),
            "AnthropicProvider.complete": lambda: provider.complete(request, 30.0),
            "stream: SDK typed events": lambda: list(sdk.messages.create(**body, stream=True, timeout=30)),
            "stream: provider.open_stream": lambda: list(provider.open_stream(request, 30.0)),
        }
        print(f"{'layer':<32} {'wall median':>12} {'CPU per call':>13}")
        for name, call in rows.items():
            wall, cpu = timed(call, args.calls)
            print(f"{name:<32} {wall:9.3f} ms {cpu:10.3f} ms")
        provider.close()


if __name__ == "__main__":
    main()

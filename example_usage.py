"""A standalone client demo: calls each endpoint of a running gateway and checks the answers.

    python example_usage.py                          # against http://localhost:8081
    python example_usage.py --url http://host:8081   # or API_URL=http://host:8081
    API_KEY=mtk_... python example_usage.py          # a gateway that requires client API keys

Prints one line per check and a summary; exits 1 if any check failed, so it also works as
a smoke test after a deployment. It needs `requests` and, for the OpenAI-compatible step, the
official `openai` SDK (pointed at the gateway's `/v1`), not the gateway's own modules.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from collections.abc import Callable

import requests

DEFAULT_URL = "http://localhost:8081"
TIMEOUT_SECONDS = 60


class Check(Exception):
    """A check's expectation was not met."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Check(message)


class Demo:
    def __init__(self, base_url: str, api_key: str = ""):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.api = self.base_url + "/api/v1"
        self.http = requests.Session()
        if api_key:
            self.http.headers["Authorization"] = f"Bearer {api_key}"

    def post(self, path: str, payload) -> requests.Response:
        return self.http.post(self.api + path, json=payload, timeout=TIMEOUT_SECONDS)

    def answer(self, path: str, payload) -> dict:
        response = self.post(path, payload)
        expect(response.status_code == 200, f"HTTP {response.status_code}: {response.text[:200]}")
        return response.json()

    def health_check(self) -> str:
        response = self.http.get(self.api + "/health", timeout=TIMEOUT_SECONDS)
        expect(response.status_code == 200, f"HTTP {response.status_code}")
        body = response.json()
        expect(body.get("status") == "ok", f"status is {body.get('status')!r}")
        return f"{body['status']}, {body['mode']} mode, model {body['model']}, version {body['version']}"

    def text_generation(self) -> str:
        body = self.answer("/generate/text", {"prompt": "Write a short story about a robot learning to paint"})
        text = body.get("generated_text", "")
        expect(len(text) > 20, "the generated text is too short")
        return f"{len(text)} characters, {body['usage']['total_tokens']} tokens: {text[:60]!r}..."

    def code_generation(self) -> str:
        body = self.answer("/generate/code", {"prompt": "Create a Python function to calculate fibonacci numbers"})
        code = body.get("generated_code", "")
        expect("```" not in code, "the code still has markdown fences")
        try:
            tree = ast.parse(code)
        except SyntaxError as exc:
            raise Check(f"the code does not parse: {exc}") from None
        functions = [node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)]
        expect(bool(functions), "the code defines no function")
        return f"valid Python defining {', '.join(functions)}()"

    def text_classification(self) -> str:
        cases = [
            ("This movie was amazing! I loved every minute.", ["positive", "negative", "neutral"]),
            ("The delivery was late and the box was broken.", ["positive", "negative", "neutral"]),
            ("My invoice shows a double charge this month.", ["billing", "technical support", "sales"]),
        ]
        labels = []
        for text, categories in cases:
            label = self.answer("/classify/text", {"text": text, "categories": categories}).get("classification")
            expect(label in categories, f"{label!r} is not one of {categories}")
            labels.append(label)
        return ", ".join(labels)

    def error_handling(self) -> str:
        cases = [
            ("/generate/text", {}, 400),
            ("/generate/text", {"prompt": ""}, 400),
            ("/classify/text", {"text": "hello", "categories": ["only-one"]}, 400),
            ("/generate/missing", {"prompt": "hi"}, 404),
        ]
        for path, payload, status in cases:
            response = self.post(path, payload)
            expect(response.status_code == status, f"{path} {payload} gave {response.status_code}, expected {status}")
            body = response.json()
            expect({"error", "code", "request_id"} <= set(body), f"error body lacks the standard fields: {body}")
        return f"{len(cases)} bad requests, each a JSON error with the right status"

    def openai_sdk(self) -> str:
        """The official OpenAI SDK, unchanged but for its base URL: the gateway key is its API key."""
        import openai  # only this step needs it

        client = openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.api_key or "no-key-needed",
                               timeout=TIMEOUT_SECONDS, max_retries=0)
        messages = [{"role": "system", "content": "Answer in one short paragraph."},
                    {"role": "user", "content": "Explain what an API gateway does"}]
        reply = client.chat.completions.create(model="gemini-2.0-flash", messages=messages)
        text = reply.choices[0].message.content or ""
        expect(len(text) > 20 and reply.usage.total_tokens > 0, f"a short or unmetered answer: {reply}")
        pieces, usage = [], None
        story = [{"role": "user", "content": "Tell a short story about a lighthouse keeper"}]  # not cached yet
        for chunk in client.chat.completions.create(model="gemini-2.0-flash", messages=story, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            usage = chunk.usage or usage
        expect(len("".join(pieces)) > 20, "the streamed answer is too short")  # a live model words it anew
        expect(usage is not None and usage.completion_tokens > 0, "the stream sent no usage")
        try:
            client.chat.completions.create(model="gemini-2.0-flash", messages=messages, n=2)
        except openai.BadRequestError as exc:
            expect(exc.param == "n", f"the refusal names {exc.param!r}, not 'n'")
        else:
            raise Check("n=2 was not refused")
        return (f"{reply.model} answered {reply.usage.total_tokens} tokens, streamed {usage.total_tokens} in "
                f"{len([piece for piece in pieces if piece])} chunks; n=2 refused naming 'n'")


def run_check(name: str, check: Callable[[], str]) -> bool:
    started = time.perf_counter()
    try:
        summary = check()
    except Check as exc:
        print(f"FAIL  {name}: {exc}")
        return False
    except requests.RequestException as exc:
        print(f"FAIL  {name}: cannot reach the gateway ({type(exc).__name__}: {exc})")
        return False
    print(f"PASS  {name} ({(time.perf_counter() - started) * 1000:.0f} ms): {summary}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("API_URL", DEFAULT_URL), help="gateway base URL")
    args = parser.parse_args(argv)
    demo = Demo(args.url, os.environ.get("API_KEY", ""))  # from the environment only: not in the process list
    print(f"Checking the Multi-Task LLM API at {args.url}")
    checks = [
        ("Health check", demo.health_check),
        ("Text generation", demo.text_generation),
        ("Code generation", demo.code_generation),
        ("Text classification", demo.text_classification),
        ("Error handling", demo.error_handling),
        ("OpenAI SDK on /v1", demo.openai_sdk),
    ]
    passed = sum(run_check(name, check) for name, check in checks)
    print(f"\nOverall: {passed}/{len(checks)} checks passed")
    if passed == len(checks):
        print("All checks completed successfully.")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())

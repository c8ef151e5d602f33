"""The provider emulators for tests and benchmarks, and the key tests give Gemini's.

In-process, the Gemini emulator is `gateway.providers.emulators.gemini.GeminiEmulator` (the
`emulator` fixtures of `tests/conftest.py`); `emulator_process` runs any of the three as its own
process, as the benchmarks need (so the load generator does not share its GIL).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

from tests.support.processes import ROOT, free_port, stop, wait_until_up

TEST_KEY = "test-key-not-a-secret"  # what the gateway sends the emulator as GOOGLE_API_KEY in tests


EMULATOR_MODULES = {"gemini": "gateway.providers.emulators.gemini",
                    "openai": "gateway.providers.emulators.openai_compat",
                    "anthropic": "gateway.providers.emulators.anthropic"}


@contextlib.contextmanager
def emulator_process(delay: float = 0.0, provider: str = "gemini") -> Iterator[str]:
    """`python -m gateway.providers.emulators.<provider>` on a free port; yields its base URL
    (`http://127.0.0.1:PORT`; the OpenAI-compatible API is under its `/v1`)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", EMULATOR_MODULES[provider], "--port", str(port),
                                "--delay", str(delay)], cwd=ROOT, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url + "/_emulator/stats", process)
        yield url
    finally:
        stop(process)

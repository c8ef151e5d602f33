"""The Gemini emulator for tests and benchmarks, and the key they give it.

In-process, the emulator is `gateway.providers.emulators.gemini.GeminiEmulator` (the `emulator`
fixtures of `tests/conftest.py`); `emulator_process` runs it as its own process, as the
benchmarks need (so the load generator does not share its GIL).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

from tests.support.processes import ROOT, free_port, stop, wait_until_up

TEST_KEY = "test-key-not-a-secret"  # what the gateway sends the emulator as GOOGLE_API_KEY in tests


@contextlib.contextmanager
def emulator_process(delay: float = 0.0) -> Iterator[str]:
    """`python -m gateway.providers.emulators.gemini` on a free port; yields its base URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "gateway.providers.emulators.gemini", "--port", str(port),
                                "--delay", str(delay)], cwd=ROOT, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url + "/_emulator/stats", process)
        yield url
    finally:
        stop(process)

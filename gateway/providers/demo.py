"""Where the gateway sends its Gemini calls: the real API, a configured URL, or demo mode.

Demo mode is the embedded default for a fresh laptop: with no `GOOGLE_API_KEY` outside
production, the gateway starts the Gemini emulator in-process on a free loopback port and
sends the real SDK's calls there, so every endpoint works end to end without a key or the
internet. Production never falls back to it (`Config.validate` refuses a missing key).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from gateway.config import Config

log = logging.getLogger("gateway.upstream")

DEMO_API_KEY = "demo-key-not-secret"


@dataclass(frozen=True)
class Upstream:
    """The provider endpoint one gateway instance talks to."""

    mode: str  # "live" or "demo"
    api_key: str
    base_url: str | None  # None: the SDK's default (Google's public endpoint)

    @property
    def provider(self) -> str:
        return "demo" if self.mode == "demo" else "gemini"


@functools.cache
def _demo_emulator():
    """One emulator per process, started on first use and shared by every app instance."""
    from gateway.providers.emulators.gemini import GeminiEmulator

    return GeminiEmulator(host="127.0.0.1", port=0).start()


def resolve_upstream(config: Config) -> Upstream:
    """Decide live or demo from the config, starting the in-process emulator for demo."""
    if not config.demo_mode:
        if not config.key_looks_like_google:
            log.warning("GOOGLE_API_KEY does not start with 'AIza'; Google keys do, so calls may be refused")
        return Upstream(mode="live", api_key=config.google_api_key, base_url=config.gemini_base_url or None)
    emulator = _demo_emulator()
    log.warning(
        "DEMO MODE: no GOOGLE_API_KEY set, answering from the built-in Gemini emulator at %s. "
        "Set GOOGLE_API_KEY to use Gemini.", emulator.base_url,
    )
    return Upstream(mode="demo", api_key=DEMO_API_KEY, base_url=emulator.base_url)

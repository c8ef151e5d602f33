"""Where the gateway sends its provider calls: the real APIs, configured URLs, or demo mode.

Demo mode is the embedded default for a fresh laptop: with no provider key at all
(`GOOGLE_API_KEY`, `OPENAI_API_KEY`, `ANTHROPIC_API_KEY`) outside production, the gateway starts
the Gemini, OpenAI-compatible and Anthropic emulators in-process on free loopback ports and sends
the real SDKs' calls there, so every endpoint and every model of the registry works end to end
without a key or the internet. Production never falls back to it (`Config.validate` refuses it).
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
def _demo_emulator(provider: str):
    """One emulator per provider and process, started on first use and shared by every app instance."""
    if provider == "openai":
        from gateway.providers.emulators.openai_compat import OpenAIEmulator as Emulator
    elif provider == "anthropic":
        from gateway.providers.emulators.anthropic import AnthropicEmulator as Emulator
    else:
        from gateway.providers.emulators.gemini import GeminiEmulator as Emulator
    return Emulator(host="127.0.0.1", port=0).start()


def demo_endpoint(provider: str) -> tuple[str, str]:
    """(base URL, key) of the demo emulator speaking `provider`'s protocol (started on first use)."""
    return _demo_emulator(provider).base_url, DEMO_API_KEY


def resolve_upstream(config: Config) -> Upstream:
    """Decide live or demo from the config, starting the in-process emulator for demo."""
    if not config.demo_mode:
        if config.google_api_key and not config.key_looks_like_google:
            log.warning("GOOGLE_API_KEY does not start with 'AIza'; Google keys do, so calls may be refused")
        return Upstream(mode="live", api_key=config.google_api_key, base_url=config.gemini_base_url or None)
    emulator = _demo_emulator("gemini")
    log.warning(
        "DEMO MODE: no provider key set, answering from the built-in emulators (Gemini at %s, OpenAI and "
        "Anthropic started on first use). Set GOOGLE_API_KEY, OPENAI_API_KEY or ANTHROPIC_API_KEY to go live.",
        emulator.base_url,
    )
    return Upstream(mode="demo", api_key=DEMO_API_KEY, base_url=emulator.base_url)

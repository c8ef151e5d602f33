"""Shared fixtures: one Gemini emulator on a free loopback port, configs, clients and apps.

Only the I/O boundary is faked: the provider is the emulator (a real HTTP server speaking
Gemini's REST protocol, reached through the real SDK and LangChain), and retry waits go to a
FakeClock so no test really sleeps.
"""

from __future__ import annotations

import threading

import pytest

from app import create_app
from gateway.config import Config
from gateway.providers.emulators.gemini import GeminiEmulator
from gemini_wrapper import GeminiClient
from tests.fakes import FakeClock

TEST_KEY = "test-key-not-a-secret"


@pytest.fixture(scope="session")
def emulator_server():
    server = GeminiEmulator(host="127.0.0.1", port=0).start()
    yield server
    server.stop()


@pytest.fixture
def emulator(emulator_server):
    """The shared emulator, with faults, counters and records cleared for this test."""
    emulator_server.reset()
    emulator_server.reply_delay = 0.0
    yield emulator_server
    emulator_server.reset()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def make_config(emulator, tmp_path):
    def build(**overrides) -> Config:
        settings = {"app_env": "testing", "google_api_key": TEST_KEY, "gemini_base_url": emulator.base_url,
                    "log_dir": tmp_path / "logs", "cost_ledger_path": tmp_path / "ledger.sqlite3",
                    "log_console": False, "gemini_pool_shards": 2}
        settings.update(overrides)
        return Config.load({}, **settings)

    return build


@pytest.fixture
def make_client(make_config, clock):
    def build(config: Config | None = None, **policy) -> GeminiClient:
        policy.setdefault("sleep", clock.sleep)
        policy.setdefault("clock", clock.now)
        return GeminiClient.from_config(config or make_config(), **policy)

    return build


@pytest.fixture
def make_app(make_config, clock):
    """Build apps whose retries wait on the fake clock; their logs and ledgers are closed afterwards."""
    apps = []

    def build(client_policy: dict | None = None, **overrides):
        policy = {"sleep": clock.sleep, "clock": clock.now, **(client_policy or {})}
        app = create_app(make_config(**overrides), retry_overrides=policy)
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["gateway"].close()


@pytest.fixture
def client(make_app):
    """A Flask test client of a gateway with default settings, pointed at the emulator."""
    return make_app(ratelimit_enabled=False).test_client()


class LiveServer:
    """A gateway app served by waitress on a free loopback port, in a background thread."""

    def __init__(self, app, threads: int = 16):
        from waitress.server import create_server

        self.app = app
        self.server = create_server(app, host="127.0.0.1", port=0, threads=threads)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.server.run()
        except OSError:
            pass  # close() from the test thread pulls the socket out from under select(): expected

    def close(self):
        self.server.close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve():
    """serve(app) -> LiveServer; every server started is closed after the test."""
    servers = []

    def start(app, threads: int = 16) -> LiveServer:
        servers.append(LiveServer(app, threads))
        return servers[-1]

    yield start
    for server in servers:
        server.close()

"""Shared fixtures: one Gemini emulator on a free loopback port, configs, clients, apps, live servers.

Only the I/O boundary is faked: the provider is the emulator (a real HTTP server speaking
Gemini's REST protocol, reached through the real SDK and LangChain), and retry waits go to a
FakeClock so no test really sleeps.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from app import create_app
from gateway.config import Config
from gateway.providers.emulators.gemini import GeminiEmulator
from gateway.providers.emulators.openai_compat import OpenAIEmulator
from gemini_wrapper import GeminiClient
from tests.fakes import FakeClock
from tests.support.emulators import TEST_KEY
from tests.support.live_server import LiveServer
from tests.support.processes import ROOT, environment, free_port, stop, wait_for_health


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


@pytest.fixture(scope="session")
def openai_server():
    """An OpenAI-compatible emulator for the fallback and /v1 tests (cleared around each test by openai_emulator)."""
    server = OpenAIEmulator(host="127.0.0.1", port=0).start()
    yield server
    server.stop()


@pytest.fixture
def openai_emulator(openai_server):
    openai_server.reset()
    yield openai_server
    openai_server.reset()


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


@pytest.fixture
def serve():
    """serve(app) -> LiveServer; every server started is closed after the test."""
    servers = []

    def start(app, threads: int = 16, **waitress_settings) -> LiveServer:
        servers.append(LiveServer(app, threads=threads, **waitress_settings))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def launch(tmp_path):
    """launch(*args, **settings) starts serve.py on a free port in demo mode -> (supervisor, port).

    Whatever a test leaves running is stopped afterwards, workers included."""
    started: list[subprocess.Popen] = []

    def start(*args: str, preexec_fn=None, **settings) -> tuple[subprocess.Popen, int]:
        port = free_port()
        env = environment(RATELIMIT_ENABLED="false", LOG_CONSOLE="false", LOG_DIR=str(tmp_path / "logs"),
                          COST_LEDGER_PATH=str(tmp_path / "ledger.sqlite3"), GEMINI_POOL_SHARDS="2", **settings)
        process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--host", "127.0.0.1", "--port", str(port),
                                    *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, preexec_fn=preexec_fn)
        started.append(process)
        wait_for_health(port, process)
        return process, port

    yield start
    for process in started:
        if process.poll() is None:
            stop(process)

"""Every log sink is redacted, stderr included (issue 8, item 15a).

An upstream that echoed the key in a malformed stream chunk put the key on stderr: the SDK's
exception quoted the raw chunk, and its traceback went out through Python logging's root handler.
The end-to-end test runs the gateway under waitress in a subprocess, as production does, against
a fake upstream on loopback that does exactly that; the in-process tests cover the loggers one by one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from enhanced_logging import REDACTED, RedactingFormatter, redact_log_handlers
from tests.support.processes import ROOT, free_port, stop, wait_for_health

KEY = "live-key-ECHOED-0123456789abcdef"  # not shaped like a Google key: only the configured secret rule can catch it


class EchoingUpstream(BaseHTTPRequestHandler):
    """A Gemini stand-in whose stream sends one good chunk, then a malformed one quoting the key."""

    def log_message(self, format, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        good = {"candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}}]}
        if "streamGenerateContent" in self.path:
            body = f"data: {json.dumps(good)}\n\ndata: {{\"echo\": {KEY}\n\n".encode()
            content_type = "text/event-stream"
        else:
            body, content_type = f'{{"echo": {KEY}'.encode(), "application/json"
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoingUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# The gateway as `waitress-serve app:app` builds it, plus one forced record on waitress's logger
# whose message, arguments and traceback all hold the key.
SERVER = """
import logging, os, sys
from waitress import serve
import app
application = app.app
try:
    raise ConnectionError("upstream said: key " + os.environ["GOOGLE_API_KEY"] + " rejected")
except ConnectionError:
    logging.getLogger("waitress").exception("forced failure for %s", os.environ["GOOGLE_API_KEY"])
serve(application, host="127.0.0.1", port=int(sys.argv[1]))
"""


def test_an_upstream_echoing_the_key_never_puts_it_on_stderr(tmp_path, upstream):
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GEMINI_", "RATELIMIT_", "LOG_"))}
    env.update(GOOGLE_API_KEY=KEY, GEMINI_BASE_URL=upstream, APP_ENV="development", PYTHONPATH=str(ROOT),
               LOG_DIR=str(tmp_path / "logs"), COST_LEDGER_PATH=str(tmp_path / "ledger.sqlite3"),
               LOG_LEVEL="INFO", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_health(port, process, timeout=60)
        for path in ("/api/v1/generate/text/stream", "/api/v1/generate/text"):
            answer = requests.post(f"http://127.0.0.1:{port}{path}", json={"prompt": "hi"}, timeout=30)
            assert KEY not in answer.text
    finally:
        _, err = stop(process, timeout=15)
    assert "forced failure for" in err and "Traceback" in err and "ConnectionError: upstream said" in err
    assert KEY not in err
    assert err.count(REDACTED) >= 2  # the forced record's argument and its traceback's exception text
    logs = "".join(path.read_text(encoding="utf-8") for path in (tmp_path / "logs").iterdir())
    assert KEY not in logs


@pytest.fixture
def captured():
    """A stream handler on the root logger and one on waitress's, as `logging.basicConfig` or an
    operator's setup would leave them before the app is built."""
    stream = io.StringIO()
    handlers = [(logging.getLogger(), logging.StreamHandler(stream)),
                (logging.getLogger("waitress"), logging.StreamHandler(stream))]
    for logger, handler in handlers:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    yield stream
    for logger, handler in handlers:
        logger.removeHandler(handler)


def test_create_app_redacts_every_logging_handler(make_app, captured):
    make_app(google_api_key=KEY)
    for name in ("waitress", "werkzeug", "gateway.http", "app"):
        try:
            raise RuntimeError(f"chunk was {{'echo': {KEY}}} and Authorization: Bearer abcdefghijklmnop")
        except RuntimeError:
            logging.getLogger(name).exception("%s saw %s", name, KEY, stack_info=True)
    text = captured.getvalue()
    assert text.count("RuntimeError: chunk was") >= 4 and "Stack (most recent call last)" in text
    assert KEY not in text and "abcdefghijklmnop" not in text
    assert text.count(REDACTED) >= 4 * 3


def test_redact_log_handlers_wraps_once_and_learns_new_secrets(captured):
    handler = logging.getLogger().handlers[-1]
    redact_log_handlers(["first-secret-value"])
    redact_log_handlers(["first-secret-value", "second-secret-value"])
    assert isinstance(handler.formatter, RedactingFormatter)
    assert not isinstance(handler.formatter.inner, RedactingFormatter)
    logging.getLogger("tests.redaction").error("first-secret-value then second-secret-value")
    assert captured.getvalue().strip().endswith(f"{REDACTED} then {REDACTED}")


UNCAUGHT = """
import os, threading
import app
application = app.app
key = os.environ["GOOGLE_API_KEY"]
worker = threading.Thread(target=lambda: (_ for _ in ()).throw(ValueError("thread saw " + key)), name="leaky")
worker.start()
worker.join()
raise RuntimeError("main thread saw " + key)
"""


def test_uncaught_exceptions_reach_stderr_redacted(tmp_path):
    """A traceback nothing caught (a thread's or the main one's) goes through the same redaction."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("GEMINI_", "LOG_"))}
    env.update(GOOGLE_API_KEY=KEY, APP_ENV="development", PYTHONPATH=str(ROOT), LOG_DIR=str(tmp_path / "logs"),
               COST_LEDGER_PATH=str(tmp_path / "ledger.sqlite3"), GEMINI_BASE_URL="http://127.0.0.1:9")
    finished = subprocess.run([sys.executable, "-c", UNCAUGHT], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)
    assert finished.returncode != 0
    assert "ValueError: thread saw" in finished.stderr and "RuntimeError: main thread saw" in finished.stderr
    assert KEY not in finished.stderr


OWN_KEY = "tgp-own-key-ECHOED-9f8e7d6c5b4a"  # the key of a registry entry's own key_env, in no rule's shape


class EchoingOpenAICompatible(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that fails every call with an error quoting the key it was sent."""

    def log_message(self, format, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {key}", "type": "server_error",
                                     "credential": key}}).encode()
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_keys_of_registry_models_and_the_jwt_secret_never_reach_logs_or_stderr(make_app, captured, monkeypatch,
                                                                                tmp_path):
    """Found by attack: only GOOGLE/OPENAI/ANTHROPIC_API_KEY were secrets to the JSON-lines logs, so an upstream
    of a registry entry with its own `key_env` (an Azure or Together key, say) that echoed the key in its error
    put it in api_errors.log (the chain and traceback); nor did the JSON-lines logs know AUTH_JWT_SECRET."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoingOpenAICompatible)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        models = json.loads((ROOT / "data" / "models.json").read_text(encoding="utf-8"))
        models["models"]["hosted-llama"] = {"provider": "openai", "upstream": "llama", "key_env": "HOSTED_LLAMA_KEY",
                                            "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1",
                                            "input_per_million": 0.1, "output_per_million": 0.1}
        (tmp_path / "models.json").write_text(json.dumps(models), encoding="utf-8")
        monkeypatch.setenv("HOSTED_LLAMA_KEY", OWN_KEY)
        jwt_secret = "jwt-signing-secret-0123456789abcdef-XYZ"
        app = make_app(models_file=str(tmp_path / "models.json"), ratelimit_enabled=False, cache_enabled=False,
                       auth_jwt_secret=jwt_secret, auth_jwt_issuer="https://issuer.example")
        answer = app.test_client().post("/api/v1/generate/text",
                                        json={"prompt": "hi", "model": "hosted-llama", "fallbacks": []})
        assert answer.status_code == 502, answer.get_data(as_text=True)
        gateway = app.extensions["gateway"]
        gateway.logger.log_error(RuntimeError(f"signed with {jwt_secret}"), request_id="r1")
        assert gateway.logger.flush()
        for secret in (OWN_KEY, jwt_secret):
            logging.getLogger("gateway.http").error("upstream said %s", secret)
    finally:
        server.shutdown()
        server.server_close()
    logs = "".join(path.read_text(encoding="utf-8") for path in (tmp_path / "logs").iterdir())
    assert "Incorrect API key provided: [REDACTED]" in logs  # the echo reached api_errors.log, redacted
    assert OWN_KEY not in logs and jwt_secret not in logs
    assert OWN_KEY not in captured.getvalue() and jwt_secret not in captured.getvalue()
    assert captured.getvalue().count(f"upstream said {REDACTED}") == 2

"""The user's live-server suite: nine tests against the real app under waitress, offline.

The app runs under waitress on a free loopback port in a background thread, exactly as in
production; Gemini is the emulator (a real HTTP server speaking Gemini's REST protocol), so
the real SDK and LangChain code run and no key or internet is needed. Its logs and ledger go
to a temporary folder, removed afterwards: the checkout's `logs/` and `var/` are left alone.

Run it with `python unit_test.py` or under pytest (`pytest unit_test.py`).
"""

from __future__ import annotations

import ast
import os
import tempfile
import unittest
from pathlib import Path

import requests

import gemini_wrapper
from app import create_app
from gateway.config import Config, ConfigError
from gateway.providers.emulators.gemini import GeminiEmulator
from gemini_wrapper import GeminiClient
from tests.support.live_server import LiveServer

HERE = Path(__file__).resolve().parent
TEST_KEY = "AIzaTest-offline-key-not-real"
TASK_LIMIT_PER_MINUTE = 10


class TestMultiTaskLLMAPI(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        """Start the emulator and the gateway under waitress, each on a free port; state in a temp folder."""
        cls.workdir = tempfile.TemporaryDirectory(prefix="unit-test-")  # logs and ledger: not the checkout's
        state = Path(cls.workdir.name)
        cls.emulator = GeminiEmulator(host="127.0.0.1", port=0).start()
        cls.config = Config.load(
            {}, app_env="testing", google_api_key=TEST_KEY, gemini_base_url=cls.emulator.base_url,
            ratelimit_task_limits=f"200 per day;50 per hour;{TASK_LIMIT_PER_MINUTE} per minute",
            cors_origins=("http://localhost:3000",),  # a live key: browsers get only the origins named
            log_dir=state / "logs", cost_ledger_path=state / "var" / "cost_ledger.sqlite3", log_console=False,
        )
        cls.app = create_app(cls.config)
        # As in production behind a proxy: waitress itself trusts the proxy's X-Forwarded-For.
        cls.server = LiveServer(cls.app, threads=8, trusted_proxy="127.0.0.1", trusted_proxy_count=1,
                                trusted_proxy_headers="x-forwarded-for")
        cls.base_url = cls.server.url
        cls.http = requests.Session()

    @classmethod
    def tearDownClass(cls):
        cls.http.close()
        cls.server.close()
        cls.app.extensions["gateway"].close()
        cls.emulator.stop()
        cls.workdir.cleanup()

    def setUp(self):
        self.emulator.reset()

    def post(self, path: str, payload, client: str = "10.1.0.1", **kwargs):
        """POST as a given client address (waitress trusts one proxy's X-Forwarded-For)."""
        headers = {"X-Forwarded-For": client, **kwargs.pop("headers", {})}
        return self.http.post(f"{self.base_url}/api/v1{path}", json=payload, headers=headers, timeout=10, **kwargs)

    def get(self, path: str, **kwargs):
        return self.http.get(f"{self.base_url}{path}", timeout=10, **kwargs)

    def assert_error_shape(self, response, status: int):
        self.assertEqual(response.status_code, status, response.text)
        body = response.json()
        self.assertEqual(set(body), {"error", "code", "details", "request_id"})
        self.assertTrue(body["error"])
        self.assertEqual(body["request_id"], response.headers["X-Request-ID"])
        return body

    def test_01_env_api_key_configured(self):
        """The key is read from the environment, its format checked; no key means demo mode."""
        example = (HERE / ".env.example").read_text(encoding="utf-8")
        self.assertIn("GOOGLE_API_KEY=", example)
        self.assertTrue(self.config.key_looks_like_google)
        self.assertFalse(self.config.demo_mode)
        self.assertNotIn(TEST_KEY, repr(self.config))
        self.assertTrue(Config.load({"GOOGLE_API_KEY": ""}).demo_mode)
        self.assertFalse(Config.load({"GOOGLE_API_KEY": "sk-not-google"}).key_looks_like_google)
        with self.assertRaises(ConfigError):
            Config.load({"APP_ENV": "production", "GOOGLE_API_KEY": ""})
        real_key = os.environ.get("GOOGLE_API_KEY")
        if real_key:
            self.assertTrue(real_key.startswith("AIza"), "GOOGLE_API_KEY should start with AIza")

    def test_02_flask_app_initialization(self):
        """Health answers, CORS headers are sent, the rate limiter reports its budget."""
        response = self.get("/api/v1/health", headers={"Origin": "http://localhost:3000"})
        self.assertEqual(response.status_code, 200)
        body = response.json()
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["mode"], "live")
        self.assertIn(response.headers["Access-Control-Allow-Origin"], ("*", "http://localhost:3000"))
        self.assertTrue(response.headers["X-Request-ID"])
        task = self.post("/generate/text", {"prompt": "Say hello"}, client="10.2.0.1")
        self.assertEqual(task.headers["X-RateLimit-Limit"], str(TASK_LIMIT_PER_MINUTE))

    def test_03_swagger_documentation(self):
        """Swagger UI is served from bundled files and the spec documents every endpoint."""
        ui = self.get("/swagger/")
        self.assertEqual(ui.status_code, 200)
        self.assertIn("swagger-ui", ui.text)
        spec = self.get("/swagger.json").json()
        self.assertEqual(spec["basePath"], "/api/v1")
        for path in ("/health", "/generate/text", "/generate/code", "/classify/text"):
            self.assertIn(path, spec["paths"])
        self.assertIn("Error", spec["definitions"])

    def test_04_generate_text_endpoint(self):
        """Text generation answers with text, usage and request id."""
        response = self.post("/generate/text", {"prompt": "Write a short story about a robot"})
        self.assertEqual(response.status_code, 200, response.text)
        body = response.json()
        self.assertGreater(len(body["generated_text"]), 20)
        self.assertEqual(body["model"], "gemini-2.0-flash")
        self.assertGreater(body["usage"]["output_tokens"], 0)
        self.assertEqual(self.emulator.request_count, 1)

    def test_05_generate_code_endpoint(self):
        """Code generation returns parseable Python with a function, without fences."""
        response = self.post("/generate/code", {"prompt": "Create a Python function to calculate fibonacci numbers"})
        self.assertEqual(response.status_code, 200, response.text)
        code = response.json()["generated_code"]
        self.assertNotIn("```", code)
        tree = ast.parse(code)
        self.assertTrue(any(isinstance(node, ast.FunctionDef) for node in ast.walk(tree)))
        self.assertEqual(response.json()["language"], "python")

    def test_06_classify_text_endpoint(self):
        """Classification always returns one of the given categories."""
        cases = [
            ("This movie was amazing!", ["positive", "negative", "neutral"], "positive"),
            ("The service was terrible and slow.", ["positive", "negative", "neutral"], "negative"),
            ("The package arrived on Tuesday.", ["positive", "negative", "neutral"], "neutral"),
            ("My invoice shows a double charge", ["Billing", "Technical", "Sales"], None),
        ]
        for text, categories, expected in cases:
            with self.subTest(text=text):
                response = self.post("/classify/text", {"text": text, "categories": categories}, client="10.6.0.1")
                self.assertEqual(response.status_code, 200, response.text)
                label = response.json()["classification"]
                self.assertIn(label, categories)
                if expected:
                    self.assertEqual(label, expected)

    def test_07_endpoint_error_handling(self):
        """Bad requests get the JSON error shape with the right status, never a traceback."""
        body = self.assert_error_shape(self.post("/generate/text", {}, client="10.7.0.1"), 400)
        self.assertIn("prompt", body["details"]["fields"])
        body = self.assert_error_shape(self.post("/classify/text", {"text": "hi"}, client="10.7.0.2"), 400)
        self.assertIn("categories", body["details"]["fields"])
        self.assert_error_shape(self.http.post(f"{self.base_url}/api/v1/generate/code", data="not json",
                                               headers={"Content-Type": "text/plain"}, timeout=10), 415)
        self.assert_error_shape(self.get("/api/v1/does-not-exist"), 404)
        self.assert_error_shape(self.get("/api/v1/generate/text"), 405)
        self.emulator.set_steady_fault("malformed")
        self.assert_error_shape(self.post("/generate/text", {"prompt": "hello"}, client="10.7.0.3"), 502)
        self.emulator.clear_faults()
        self.assertEqual(self.get("/api/v1/health").status_code, 200)

    def test_08_rate_limiting(self):
        """A client past its per-minute budget gets 429 with Retry-After; others are unaffected."""
        statuses = [self.post("/generate/text", {"prompt": f"hello {i}"}, client="10.8.0.1").status_code
                    for i in range(TASK_LIMIT_PER_MINUTE + 2)]
        self.assertEqual(statuses[:TASK_LIMIT_PER_MINUTE], [200] * TASK_LIMIT_PER_MINUTE)
        self.assertEqual(statuses[TASK_LIMIT_PER_MINUTE:], [429, 429])
        limited = self.post("/generate/text", {"prompt": "again"}, client="10.8.0.1")
        body = self.assert_error_shape(limited, 429)
        self.assertEqual(body["code"], "rate_limited")
        self.assertGreater(int(limited.headers["Retry-After"]), 0)
        self.assertEqual(limited.headers["X-RateLimit-Remaining"], "0")
        self.assertEqual(self.post("/generate/text", {"prompt": "hi"}, client="10.8.0.2").status_code, 200)
        self.assertEqual(self.get("/api/v1/health").status_code, 200)

    def test_09_direct_wrapper_functions(self):
        """The wrapper's functions work directly, and retry through rate limits with backoff."""
        saved = {name: os.environ.get(name) for name in ("GOOGLE_API_KEY", "GEMINI_BASE_URL", "APP_ENV")}
        os.environ.update(GOOGLE_API_KEY=TEST_KEY, GEMINI_BASE_URL=self.emulator.base_url, APP_ENV="testing")
        gemini_wrapper.default_client.cache_clear()
        try:
            self.assertGreater(len(gemini_wrapper.generate_text("Describe the sea")), 20)
            self.assertIn("def ", gemini_wrapper.generate_code("Reverse a string"))
            self.assertEqual(gemini_wrapper.classify_text("I love it", ["positive", "negative"]), "positive")
        finally:
            gemini_wrapper.default_client.cache_clear()
            for name, value in saved.items():
                os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)

        waits = []
        client = GeminiClient.from_config(self.config, sleep=waits.append)
        self.emulator.reset()
        self.emulator.inject("rate_limit", times=2, retry_delay=1)
        self.assertTrue(client.generate_text("hello after backoff").text)
        self.assertEqual(self.emulator.request_count, 3)
        self.assertEqual(waits, [1.0, 1.0])

        waits.clear()
        self.emulator.reset()
        self.emulator.inject("server_error", times=2)
        self.assertTrue(client.generate_text("hello after 500s").text)
        self.assertEqual(len(waits), 2)
        self.assertLess(waits[0], waits[1])  # exponential: about 1 s, then about 2 s


if __name__ == "__main__":
    unittest.main(verbosity=2)

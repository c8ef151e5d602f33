"""Headless Chromium driven over the Chrome DevTools Protocol, for the Swagger UI test.

Debian's `chromium` started with `--remote-debugging-port=0` names its DevTools socket on
stderr; a websocket (the `websockets` package google-genai already brings) carries the
protocol's JSON messages. Only what the test needs: open a page, run JavaScript (awaiting its
promise, so waiting happens in the page against a deadline, not in sleeps here), and collect
what the browser reports: console lines, log entries (CSP violations among them) and uncaught
exceptions. A script installed before every document also records `securitypolicyviolation`
events, the browser's own word on what the page's CSP refused.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import threading
from contextlib import ExitStack
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser")
RECORD_CSP_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", function (event) {
  window.__cspViolations.push({directive: event.violatedDirective, blocked: event.blockedURI,
                               source: event.sourceFile, line: event.lineNumber, sample: event.sample});
});
"""


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    """The browser failed to start, a command failed, or the page's script threw."""


class Chromium:
    """One headless Chromium process with one page target attached."""

    def __init__(self, binary: str, profile_dir: Path, timeout: float = 30.0) -> None:
        from websockets.sync.client import connect

        self.timeout = timeout
        self.events: list[dict] = []
        self.stderr_lines: list[str] = []
        self._ids = itertools.count(1)
        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile_dir}",
             "--enable-logging=stderr", "--log-level=0", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": "disabled:"},
        )
        ready = threading.Event()
        self._browser_url = ""

        def drain() -> None:  # stderr must be read to the end, or a chatty browser blocks on a full pipe
            for line in self.process.stderr:
                self.stderr_lines.append(line.rstrip("\n"))
                if line.startswith("DevTools listening on "):
                    self._browser_url = line.split(" on ", 1)[1].strip()
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(timeout) or not self._browser_url:
            self.close()
            raise BrowserError("chromium did not start:\n" + "\n".join(self.stderr_lines[-20:]))
        self._closing = ExitStack()
        self.socket = self._closing.enter_context(connect(self._browser_url, max_size=None, open_timeout=timeout))
        target = self.command("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.command("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.command(f"{domain}.enable", session=True)
        self.command("Page.addScriptToEvaluateOnNewDocument", session=True, source=RECORD_CSP_VIOLATIONS)

    def command(self, method: str, session: bool = False, **params) -> dict:
        """Send one DevTools command and return its result; events that arrive meanwhile are kept."""
        message_id = next(self._ids)
        message = {"id": message_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(self.socket.recv(timeout=self.timeout))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def navigate(self, url: str) -> None:
        self.command("Page.navigate", session=True, url=url)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page; a promise is awaited (the page does the waiting)."""
        result = self.command("Runtime.evaluate", session=True, expression=expression, awaitPromise=True,
                              returnByValue=True, timeout=int(self.timeout * 1000))
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            said = "\n".join(self.reports()[-10:])
            raise BrowserError(f"{details.get('exception', {}).get('description') or details.get('text')}"
                               f"\nthe browser said:\n{said}")
        return result["result"].get("value")

    def reports(self) -> list[str]:
        """What the browser said about the page: log entries, console calls and uncaught exceptions."""
        said = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Log.entryAdded":
                entry = params["entry"]
                said.append(f"log {entry.get('level')} {entry.get('source')}: {entry.get('text')}")
            elif method == "Runtime.consoleAPICalled":
                texts = [str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])]
                said.append(f"console {params.get('type')}: {' '.join(texts)}")
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                said.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        return said

    def close(self) -> None:
        closing = getattr(self, "_closing", None)
        if closing is not None:
            closing.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

"""The Swagger UI in a real browser, under the page's Content-Security-Policy.

Headless Chromium (Debian's `chromium`, which `.ci/run` installs) loads /swagger/ from a live
server and must render every operation with nothing refused by the CSP and nothing thrown; then
the Authorize dialog takes a key for each scheme and Try it out sends it, as seen by the server.
Skips with a visible reason where no chromium is installed; with CI set it fails instead.
"""

from __future__ import annotations

import json
import os

import pytest
from flask import request

from tests.cdp import Chromium, find_chromium

OPERATIONS = {  # Swagger UI's element id of each operation -> its path
    "operations-health-get_health": "/health",
    "operations-generate-post_text_generation": "/generate/text",
    "operations-generate-post_code_generation": "/generate/code",
    "operations-generate-post_text_generation_stream": "/generate/text/stream",
    "operations-classify-post_text_classification": "/classify/text",
    "operations-batch-post_batch_generation": "/generate/batch",
    "operations-process-post_prompt_processing": "/process",
    "operations-stats-get_stats": "/stats",
    "operations-keys-get_keys": "/keys",
    "operations-keys-post_keys": "/keys",
    "operations-keys-get_own_usage": "/keys/me/usage",
    "operations-keys-delete_key": "/keys/{key_id}",
    "operations-keys-get_key_usage": "/keys/{key_id}/usage",
    "operations-usage-get_usage_export": "/usage/export",
    "operations-models-get_models": "/models",
    "operations-ready-get_ready": "/ready",
    "operations-status-get_status": "/status",
}
SCHEMES = {"Bearer": ("Authorization", "Bearer mtk_browser_test_key"),
           "ApiKey": ("X-API-Key", "mtk_browser_test_key_2"),
           "ApiToken": ("X-API-Token", "mtk_browser_test_key_3")}

# Waiting happens in the page: a condition polled every 25 ms against a deadline, as a promise.
WAIT_FOR = """window.__waitFor = (test, ms) => new Promise((resolve, reject) => {
  const started = Date.now();
  (function poll() {
    let value; try { value = test(); } catch (error) { value = null; }
    if (value) return resolve(value);
    if (Date.now() - started > ms) return reject(new Error("timed out waiting for " + test));
    setTimeout(poll, 25);
  })();
}); true"""
AUTHORIZE = """(async (scheme, value) => {
  document.querySelector(".btn.authorize").click();
  const box = await __waitFor(() => [...document.querySelectorAll(".auth-container")]
      .find(c => c.querySelector("h4 code").textContent === scheme), 5000);
  const input = box.querySelector("input");  // React owns the input: set it as typing would
  Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, "value").set.call(input, value);
  input.dispatchEvent(new Event("input", {bubbles: true}));
  box.querySelector("button.authorize").click();
  await __waitFor(() => box.textContent.includes("Authorized"), 5000);
  document.querySelector(".close-modal").click();
  return document.querySelector(".btn.authorize").className;
})(%s, %s)"""
LOGOUT = """(async (scheme) => {
  document.querySelector(".btn.authorize").click();
  const box = await __waitFor(() => [...document.querySelectorAll(".auth-container")]
      .find(c => c.querySelector("h4 code").textContent === scheme), 5000);
  [...box.querySelectorAll("button")].find(b => b.textContent === "Logout").click();
  await __waitFor(() => box.querySelector("input"), 5000);
  document.querySelector(".close-modal").click();
  return true;
})(%s)"""
TRY_IT_OUT = """(async (id) => {
  const op = document.getElementById(id);
  const answer = () => op.querySelector(".live-responses-table .response .response-col_status");
  if (!op.querySelector("button.execute")) {
    if (!op.classList.contains("is-open")) op.querySelector(".opblock-summary-control").click();
    (await __waitFor(() => op.querySelector(".try-out__btn"), 5000)).click();
  }
  if (answer()) {  // an earlier answer: clear it, so the one awaited below is this request's
    op.querySelector(".btn-clear").click();
    await __waitFor(() => !answer(), 5000);
  }
  (await __waitFor(() => op.querySelector("button.execute"), 5000)).click();
  return (await __waitFor(answer, 20000)).textContent.trim();
})(%s)"""


@pytest.fixture
def chromium_path():
    path = find_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but no chromium is installed (.ci/run installs Debian's chromium)")
        pytest.skip("no chromium on PATH: the Swagger UI browser test needs Debian's chromium package")
    return path


@pytest.fixture
def browser(chromium_path, tmp_path):
    chromium = Chromium(chromium_path, tmp_path / "profile")
    yield chromium
    chromium.close()


def test_swagger_ui_renders_under_its_csp_and_try_it_out_sends_each_key(make_app, serve, browser):
    app = make_app(ratelimit_enabled=False)
    seen = []  # what reached the server: path and the three key headers of each request

    @app.before_request
    def observe():
        seen.append((request.path, {name: request.headers.get(name)
                                    for name in ("Authorization", "X-API-Key", "X-API-Token")}))

    server = serve(app)
    browser.navigate(f"{server.url}/swagger/")
    browser.evaluate("new Promise(r => document.readyState === 'complete' ? r(1) : addEventListener('load', r))")
    browser.evaluate(WAIT_FOR)
    browser.evaluate("__waitFor(() => document.querySelectorAll('.opblock').length >= 6, 20000)")

    rendered = browser.evaluate("Object.fromEntries([...document.querySelectorAll('.opblock')].map(op => "
                                "[op.id, op.querySelector('.opblock-summary-path').dataset.path]))")
    assert rendered == OPERATIONS
    styled = browser.evaluate("""({bodyMargin: getComputedStyle(document.body).margin,
        icons: !!document.getElementById("locked"), wrapper: !!document.querySelector(".swagger-ui .wrapper"),
        title: document.querySelector(".info .title").textContent})""")
    assert styled["bodyMargin"] == "0px" and styled["icons"] and styled["wrapper"]  # our CSS, the icons, swagger-ui.css
    assert styled["title"].startswith("Multi-Task LLM API")

    for scheme, (header, value) in SCHEMES.items():
        assert "locked" in browser.evaluate(AUTHORIZE % (json.dumps(scheme), json.dumps(value))).split()
        del seen[:]
        status = browser.evaluate(TRY_IT_OUT % json.dumps("operations-generate-post_text_generation"))
        assert status == "200"
        sent = [headers for path, headers in seen if path == "/api/v1/generate/text"]
        assert sent == [{**dict.fromkeys(("Authorization", "X-API-Key", "X-API-Token")), header: value}]
        browser.evaluate(LOGOUT % json.dumps(scheme))

    assert browser.evaluate("window.__cspViolations") == []
    assert browser.reports() == []  # no console message, no CSP report, no uncaught exception

    # The policy is in force (not merely unviolated): an injected inline script is refused.
    browser.evaluate("(() => { const s = document.createElement('script'); s.textContent = 'window.__ran = 1'; "
                     "document.body.append(s); })()")
    assert browser.evaluate("window.__ran === undefined")
    violations = browser.evaluate("__waitFor(() => window.__cspViolations.length && window.__cspViolations, 5000)")
    assert [v["directive"] for v in violations] == ["script-src-elem"]

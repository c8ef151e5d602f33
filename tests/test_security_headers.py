"""Security headers on every response, the Swagger page's CSP, HSTS by setting, no Server header,
and the API-key schemes of the spec."""

from __future__ import annotations

import http.client
import json
import re

import requests

from gateway import serve
from gateway.http.security_headers import API_CSP, HSTS_VALUE, SWAGGER_CSP
from tests.support.live_server import LiveServer

ALWAYS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}
API = {**ALWAYS, "Content-Security-Policy": API_CSP, "Cache-Control": "no-store"}


def assert_headers(response, expected: dict) -> None:
    for name, value in expected.items():
        assert response.headers.getlist(name) == [value], (name, response.status_code, response.headers)


def every_kind_of_answer(app, emulator):
    """(label, response) for each kind of answer the API gives: success, each error path, the spec."""
    client = app.test_client()

    @app.route("/boom")
    def boom():  # an unexpected failure in a view: the 500 path
        raise RuntimeError("boom")

    task = "/api/v1/generate/text"
    yield "health 200", client.get("/api/v1/health")
    yield "task 200", client.post(task, json={"prompt": "hello"})
    yield "classify 200", client.post("/api/v1/classify/text", json={"text": "great", "categories": ["a", "b"]})
    yield "stats 200", client.get("/api/v1/stats")
    yield "400", client.post(task, json={"prompt": ""})
    yield "400 unparsable", client.post(task, data="{", content_type="application/json")
    yield "404", client.get("/nowhere")
    yield "405", client.get(task)
    yield "413", client.post(task, data="x" * (app.config["MAX_CONTENT_LENGTH"] + 1), content_type="application/json")
    yield "415", client.post(task, data="hello", content_type="text/plain")
    yield "500", client.get("/boom")
    yield "spec", client.get("/swagger.json")
    yield "preflight", client.options(task, headers={"Origin": "https://a.example",
                                                     "Access-Control-Request-Method": "POST"})
    emulator.set_steady_fault("server_error")
    yield "502", client.post(task, json={"prompt": "upstream fails"})
    emulator.clear_faults()
    yield "429", client.get("/api/v1/stats")  # RATELIMIT_STATS_LIMITS=1 per minute: the second is refused


def test_every_api_answer_carries_the_security_headers(make_app, emulator):
    app = make_app(ratelimit_task_limits="100 per minute", ratelimit_stats_limits="1 per minute")
    seen = {}
    for label, response in every_kind_of_answer(app, emulator):
        seen[label] = response.status_code
        assert_headers(response, API)
        assert "Strict-Transport-Security" not in response.headers  # HSTS_ENABLED is off by default
        assert "Server" not in response.headers
    assert seen == {"health 200": 200, "task 200": 200, "classify 200": 200, "stats 200": 200, "400": 400,
                    "400 unparsable": 400, "404": 404, "405": 405, "413": 413, "415": 415, "500": 500, "spec": 200,
                    "preflight": 200, "502": 502, "429": 429}


def test_hsts_is_sent_on_every_answer_when_enabled(make_app, emulator):
    app = make_app(ratelimit_task_limits="100 per minute", ratelimit_stats_limits="1 per minute", hsts_enabled=True)
    for _label, response in every_kind_of_answer(app, emulator):
        assert_headers(response, {**API, "Strict-Transport-Security": HSTS_VALUE})
    client = app.test_client()
    for path in ("/swagger/", "/swaggerui/swagger-ui.css"):
        assert client.get(path).headers["Strict-Transport-Security"] == HSTS_VALUE


def test_the_stream_is_neither_cached_nor_sniffed(client):
    response = client.post("/api/v1/generate/text/stream", json={"prompt": "hello"})
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    assert_headers(response, {**ALWAYS, "Content-Security-Policy": API_CSP, "Cache-Control": "no-cache, no-store"})
    assert b"event: done" in response.data


def test_the_swagger_page_has_its_own_policy_and_no_inline_code(client):
    page = client.get("/swagger/")
    assert page.status_code == 200
    assert_headers(page, {**ALWAYS, "Content-Security-Policy": SWAGGER_CSP, "Cache-Control": "no-store"})
    html = page.get_data(as_text=True)
    # What the policy allows, the page keeps to: scripts only from files, no <style>, no style="", no on*=.
    assert re.findall(r"<script\b[^>]*>", html) == [
        '<script src="/swaggerui/swagger-ui-bundle.js">', '<script src="/swaggerui/swagger-ui-standalone-preset.js">',
        '<script src="/swagger/ui.js">']
    assert "</script>" in html and not re.search(r"<script[^>]*>[^<]+</script>", html)
    assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=", html)
    assert 'data-spec-url="/api/v1/swagger.json"' in html
    assert 'id="locked"' in html and 'id="unlocked"' in html  # swagger-ui's icons refer to these symbols
    for path, mimetype in (("/swagger/ui.js", "text/javascript"), ("/swagger/ui.css", "text/css")):
        own = client.get(path)
        assert own.status_code == 200 and own.mimetype == mimetype
        assert_headers(own, {**ALWAYS, "Content-Security-Policy": SWAGGER_CSP})


def test_bundled_swagger_files_keep_their_revalidated_caching(client):
    bundle = client.get("/swaggerui/swagger-ui-bundle.js")
    assert bundle.status_code == 200
    assert_headers(bundle, {**ALWAYS, "Content-Security-Policy": SWAGGER_CSP})
    assert "no-store" not in bundle.headers.get("Cache-Control", "")  # Flask's no-cache + ETag: a 304 next time
    assert client.get("/swaggerui/swagger-ui-bundle.js",
                      headers={"If-None-Match": bundle.headers["ETag"]}).status_code == 304


def test_waitress_with_the_launchers_settings_does_not_name_itself(make_app):
    """`python app.py` and serve.py serve with `serve.waitress_settings` (ident ""): no Server header."""
    app = make_app()
    with LiveServer(app, **serve.waitress_settings(app.extensions["gateway"].config, threads=4)) as server:
        for path in ("/api/v1/health", "/nowhere"):
            response = requests.get(f"{server.url}{path}", headers={"Connection": "close"}, timeout=10)
            assert "Server" not in response.headers and "Via" not in response.headers
            assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_errors_waitress_answers_itself_carry_the_headers_too(make_app):
    """A 431 (headers too large) never reaches Flask: serve.py's JSON error task adds the headers."""
    app = make_app()
    settings = serve.waitress_settings(app.extensions["gateway"].config, threads=4)
    with LiveServer(app, channel_class=serve._json_error_channel(), **settings) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.putrequest("GET", "/api/v1/health")
        connection.putheader("X-Padding", "x" * 300_000)
        connection.endheaders()
        response = connection.getresponse()
        body = json.loads(response.read())
        assert response.status == 431 and body["code"] == "headers_too_large"
        for name, value in API.items():
            assert response.getheader(name) == value, name
        assert response.getheader("Server") is None
        connection.close()


# --- the spec's API-key schemes --------------------------------------------------------------------

TASKS = ["/generate/text", "/generate/code", "/generate/text/stream", "/classify/text"]
ANY_KEY = [{"Bearer": []}, {"ApiKey": []}, {"ApiToken": []}]


def test_the_spec_declares_the_key_schemes_on_tasks_and_stats_but_not_health(client):
    spec = client.get("/swagger.json").get_json()
    schemes = spec["securityDefinitions"]
    assert {name: (scheme["type"], scheme["in"], scheme["name"]) for name, scheme in schemes.items()} == {
        "Bearer": ("apiKey", "header", "Authorization"), "ApiKey": ("apiKey", "header", "X-API-Key"),
        "ApiToken": ("apiKey", "header", "X-API-Token")}
    assert "Bearer <key>" in schemes["Bearer"]["description"]
    assert "security" not in spec  # no global requirement: /health stays open
    paths = spec["paths"]
    assert "security" not in paths["/health"]["get"]
    assert paths["/stats"]["get"]["security"] == ANY_KEY
    assert {"401", "403"} <= set(paths["/stats"]["get"]["responses"])
    for path in TASKS:
        operation = paths[path]["post"]
        assert operation["security"] == ANY_KEY, path
        for status in ("401", "402", "403"):
            assert operation["responses"][status]["schema"] == {"$ref": "#/definitions/Error"}, (path, status)

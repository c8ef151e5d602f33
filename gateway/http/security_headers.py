"""Security headers on every response, from precomputed lists (a few microseconds per request).

Every answer, JSON or not:
  X-Content-Type-Options: nosniff   a browser never guesses a type (a JSON error is not HTML)
  X-Frame-Options: DENY             no page may frame ours (CSP `frame-ancestors 'none'` says it
                                    again for browsers that read only CSP)
  Referrer-Policy: no-referrer      a link followed from Swagger UI leaks no URL
  Strict-Transport-Security         only with HSTS_ENABLED=true (a deployment served over TLS)
API answers (everything outside the Swagger UI's static files) also get
  Cache-Control: no-store           no browser or proxy keeps a task answer, an error or the figures;
                                    the stream's `no-cache` becomes `no-cache, no-store`
  Content-Security-Policy: default-src 'none'; frame-ancestors 'none'
                                    JSON loads nothing; a response opened as a page runs nothing
The Swagger page (`/swagger/`, its script and style, the bundled files under `/swaggerui/`) gets
a policy that lets only same-origin files run: `gateway/http/swagger_ui.py` renders the page with no inline
script or style, so neither 'unsafe-inline' nor a hash is needed. `data:` images are allowed
because swagger-ui.css draws its icons as inline SVG data URLs.

The Flask-free constants here are also used by `serve.py` for the errors waitress answers itself
(413, 431, a malformed request) before the app sees the request.
"""

from __future__ import annotations

HSTS_VALUE = "max-age=31536000; includeSubDomains"  # a year: what browsers' preload lists expect at least
API_CSP = "default-src 'none'; frame-ancestors 'none'"
SWAGGER_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SWAGGER_PAGE_PREFIX = "/swagger/"  # the page and its own script and style (gateway/http/swagger_ui.py)
SWAGGER_STATIC_PREFIX = "/swaggerui/"  # Flask-RESTX's bundled files: cacheable (Flask revalidates them by ETag)
NO_STORE = "no-store"

BASE_HEADERS = (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                ("Referrer-Policy", "no-referrer"))
# What waitress's own error answers carry (serve.py): no Flask there, and no HSTS setting to read.
SERVER_ERROR_HEADERS = (*BASE_HEADERS, ("Content-Security-Policy", API_CSP), ("Cache-Control", NO_STORE))


class SecurityHeaders:
    """The headers of one app: `apply(path, headers)` adds them to a response's Werkzeug `Headers`."""

    def __init__(self, hsts: bool = False) -> None:
        base = BASE_HEADERS + ((("Strict-Transport-Security", HSTS_VALUE),) if hsts else ())
        self.api = (*base, ("Content-Security-Policy", API_CSP))
        self.swagger = (*base, ("Content-Security-Policy", SWAGGER_CSP))

    def apply(self, path: str, headers) -> None:
        if path.startswith(SWAGGER_STATIC_PREFIX):
            headers.extend(self.swagger)  # Flask's own Cache-Control (no-cache + ETag) stays
            return
        headers.extend(self.swagger if path.startswith(SWAGGER_PAGE_PREFIX) else self.api)
        cache = headers.get("Cache-Control")
        if not cache:
            headers["Cache-Control"] = NO_STORE
        elif NO_STORE not in cache:
            headers["Cache-Control"] = f"{cache}, {NO_STORE}"  # the stream's no-cache keeps its meaning


def install(app, hsts: bool = False) -> SecurityHeaders:
    """Add the headers to every response of `app` (an after-request hook; errors pass through it too)."""
    from flask import request  # imported here: serve.py's supervisor imports this module without Flask

    security = SecurityHeaders(hsts)
    apply = security.apply

    @app.after_request
    def add_security_headers(response):
        apply(request.path, response.headers)
        return response

    return security

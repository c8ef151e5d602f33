"""The Swagger UI page at /swagger/, with no inline script or style, so a strict CSP lets it run.

Flask-RESTX's own page starts Swagger UI from an inline <script> and styles it from an inline
<style> and a `style=""` attribute: under `script-src 'self'` the browser refuses all three unless
the policy carries their hashes (which change with every Flask-RESTX release) or 'unsafe-inline'
(which would let injected markup run too). This page is the same page with the start-up code
in `/swagger/ui.js` and the styles in `/swagger/ui.css`, served from here; the bundled
swagger-ui files still come from Flask-RESTX (`/swaggerui/...`). The spec URL reaches the
script as a data attribute, and swagger-ui's icons (SVG symbols it refers to by id) are taken
from Flask-RESTX's page. `gateway/http/security_headers.py` holds the policy; tests/test_swagger_browser.py
checks in headless Chromium that the UI renders with nothing refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import flask_restx
from flask import Response, render_template_string, url_for
from markupsafe import Markup


def _bundled_icons() -> str:
    """The SVG symbols (lock, arrows, close) of Flask-RESTX's own page, which swagger-ui refers to by id;
    their inline `style` attribute becomes a class styled from ui.css."""
    page = (Path(flask_restx.__file__).parent / "templates" / "swagger-ui.html").read_text(encoding="utf-8")
    found = re.search(r"<svg\b.*?</svg>", page, re.DOTALL)
    return re.sub(r'\sstyle="[^"]*"', ' class="icon-symbols"', found.group(0), count=1) if found else ""


ICONS = Markup(_bundled_icons())

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{{ title }}</title>
  <link rel="stylesheet" href="{{ static('droid-sans.css') }}">
  <link rel="stylesheet" href="{{ static('swagger-ui.css') }}">
  <link rel="stylesheet" href="{{ url_for('swagger_ui_css') }}">
  <link rel="icon" type="image/png" href="{{ static('favicon-32x32.png') }}" sizes="32x32">
  <link rel="icon" type="image/png" href="{{ static('favicon-16x16.png') }}" sizes="16x16">
</head>
<body>
  {{ icons }}
  <div id="swagger-ui" data-spec-url="{{ specs_url }}"></div>
  <script src="{{ static('swagger-ui-bundle.js') }}"></script>
  <script src="{{ static('swagger-ui-standalone-preset.js') }}"></script>
  <script src="{{ url_for('swagger_ui_js') }}"></script>
</body>
</html>
"""

SCRIPT = """"use strict";
window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-spec-url"),
    dom_id: "#swagger-ui",
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset.slice(1)],
    plugins: [SwaggerUIBundle.plugins.DownloadUrl],
    displayOperationId: false,
    displayRequestDuration: true,
    docExpansion: "list"
  });
});
"""

STYLE = """html { box-sizing: border-box; overflow-y: scroll; }
*, *:before, *:after { box-sizing: inherit; }
body { margin: 0; background: #fafafa; }
.icon-symbols { position: absolute; width: 0; height: 0; }
"""


def install(app, api) -> None:
    """Serve the page for `api` at its doc path (/swagger/), with its script and style beside it."""

    @api.documentation
    def swagger_page():
        return render_template_string(PAGE, title=api.title, icons=ICONS, specs_url=api.specs_url,
                                      static=lambda name: url_for("restx_doc.static", filename=name))

    app.add_url_rule("/swagger/ui.js", "swagger_ui_js",
                     lambda: Response(SCRIPT, mimetype="text/javascript"))
    app.add_url_rule("/swagger/ui.css", "swagger_ui_css",
                     lambda: Response(STYLE, mimetype="text/css"))

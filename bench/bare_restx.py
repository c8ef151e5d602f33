"""The framework's own floor: one Flask-RESTX resource returning {"ok": true}, no hooks, under waitress.

    python -m bench.bare_restx --port N [--threads 128]

Served with the production launcher's waitress settings (`gateway.serve.waitress_settings`:
threads, connection limit, poll, lookahead...) and the same raised open-file limit, so the only
difference from the gateway's row is the gateway's own per-request work (issue 12). Binds to
127.0.0.1; stops on SIGTERM/SIGINT like any waitress server.
"""

from __future__ import annotations

import argparse

from flask import Flask
from flask_restx import Api, Resource

PATH = "/api/v1/ok"


def create_app() -> Flask:
    """Flask + Flask-RESTX with one resource: no before/after hooks, no error handlers of ours."""
    app = Flask(__name__)
    api = Api(app, prefix="/api/v1", doc=False)

    @api.route("/ok")
    class Ok(Resource):
        def get(self):
            return {"ok": True}

    return app


def main(argv: list[str] | None = None) -> None:
    from waitress import serve

    from gateway.config import Config
    from gateway.serve import THREADS, raise_descriptor_limit, waitress_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args(argv)
    settings = waitress_settings(Config.load({}), threads=args.threads, descriptor_limit=raise_descriptor_limit())
    serve(create_app(), host="127.0.0.1", port=args.port, **settings)


if __name__ == "__main__":
    main()

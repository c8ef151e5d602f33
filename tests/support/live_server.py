"""A WSGI app under waitress in a background thread of this process, on a free loopback port.

Why not just `server.close()` from the test's thread: waitress's loop sits in `select()` with a
1 s timeout, and closing the listening socket under it does not wake it, so every close took
about a second; the loop also kept serving open keep-alive connections, and the task threads
(`threads` of them per server) were never stopped, so each server left them behind. Here the
close runs inside the loop's own thread (through waitress's trigger, which wakes `select()` at
once): every socket is closed, the loop ends because it has nothing left to watch, and then the
task threads are stopped and waited for.
"""

from __future__ import annotations

import threading

from waitress import wasyncore
from waitress.server import create_server

from gateway.serve import CHANNEL_REQUEST_LOOKAHEAD

CLOSE_TIMEOUT_SECONDS = 5.0  # a task still running after that is left to finish (its thread is a daemon)


class LiveServer:
    """`app` served by waitress on 127.0.0.1 (a free port unless `port` is given): `url`, `port`, `close()`.

    `waitress_settings` go to `waitress.server.create_server` (threads, trusted_proxy, ...), with the
    launcher's `channel_request_lookahead` unless given (streams see a client's disconnect through it);
    `channel_class` replaces waitress's HTTP channel (serve.py's JSON error channel, say).
    Use as a context manager or call `close()`; closing twice is harmless.
    """

    def __init__(self, app, *, port: int = 0, channel_class=None, threads: int = 16, **waitress_settings):
        self.app = app
        self._sockets: dict = {}  # this server's socket map: the listener, its trigger, the connections
        waitress_settings.setdefault("channel_request_lookahead", CHANNEL_REQUEST_LOOKAHEAD)
        self.server = create_server(app, map=self._sockets, host="127.0.0.1", port=port, threads=threads,
                                    **waitress_settings)
        if channel_class is not None:
            self.server.channel_class = channel_class
        self.port = self.server.effective_port
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        self.thread = threading.Thread(target=self.server.run, name=f"live-server-{self.port}", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving now: sockets closed, the loop's thread and the task threads ended."""
        if self._closed:
            return
        self._closed = True
        try:
            self.server.trigger.pull_trigger(lambda: wasyncore.close_all(self._sockets, ignore_all=True))
        except OSError:  # the trigger is gone (seen once in a full run, cause not found): close from here
            wasyncore.close_all(self._sockets, ignore_all=True)
        self.thread.join(CLOSE_TIMEOUT_SECONDS)
        self.server.task_dispatcher.shutdown(cancel_pending=True, timeout=CLOSE_TIMEOUT_SECONDS)

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

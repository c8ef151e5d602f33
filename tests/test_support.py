"""The shared live-server helper closes at once and leaves nothing running (tests/support/live_server.py)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from tests.support.live_server import LiveServer


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


def test_close_is_prompt_and_leaves_no_thread_and_no_listener():
    before = set(threading.enumerate())
    server = LiveServer(hello, threads=4)
    session = requests.Session()  # a keep-alive connection stays open on the server's side
    assert session.get(server.url, timeout=10).text == "hello"
    started = [thread for thread in threading.enumerate() if thread not in before]
    assert len(started) >= 2  # the loop's thread and waitress's task threads

    began = time.monotonic()
    server.close()
    took = time.monotonic() - began

    assert took < 0.5, f"close took {took:.2f} s"  # it took a second (select's timeout) before
    assert [thread for thread in started if thread.is_alive()] == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    with pytest.raises(requests.ConnectionError):  # the kept connection was closed too
        session.get(server.url, timeout=5)
    server.close()  # twice is harmless


def test_waitress_settings_are_passed_through():
    with LiveServer(hello, threads=2, ident="tested-server") as server:
        response = requests.get(server.url, headers={"Connection": "close"}, timeout=10)
    assert response.headers["Server"] == "tested-server"

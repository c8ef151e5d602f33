"""What tests and benchmarks share to start real servers on loopback, one copy of each.

- `processes`: free ports, a clean environment, waiting for a server to answer, stopping a
  process (and every process it started).
- `live_server`: a WSGI app under waitress in a background thread of this process, closed
  quickly and without leaving a thread behind.
- `emulators`: the Gemini emulator as a separate process (benchmarks), and the test key.

The pytest fixtures themselves are in `tests/conftest.py`; they are built from these.
"""

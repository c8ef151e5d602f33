"""JSON-lines logs (real files, real listener thread) and redaction, in files and in Python logging."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from enhanced_logging import LOG_FILES, REDACTED, Redactor, RequestLogger, SecurityEvent

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SECRET = "sk-live-4f3e2d1c0b9a"
BEARER = "tok-9f8e7d6c5b4a3210"
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImlzcyI6Imlzc3Vlci14IiwiZXhwIjoxNzk2NTkxMDI2fQ"
       ".qCYaBa8zhsKSPYlZh1st9vWQwBR_ujLTkOJY-TPm6YY")  # a client's HS256 bearer token


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_text(log_dir: Path) -> str:
    return "".join(p.read_text(encoding="utf-8") for p in sorted(log_dir.iterdir()))


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "logs"


@pytest.fixture
def logger(log_dir: Path):
    with RequestLogger(log_dir, console=False, secrets=[SECRET]) as request_logger:
        yield request_logger


def raise_chain() -> ValueError:
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise ConnectionError("middle") from inner
    except ConnectionError:
        try:
            raise ValueError("outer")  # implicit __context__
        except ValueError as outer:
            return outer


# --- files and channels ------------------------------------------------------------------


def test_files_exist_from_construction(logger, log_dir):
    assert sorted(p.name for p in log_dir.iterdir()) == sorted(LOG_FILES.values())


@pytest.mark.parametrize(("call", "filename", "event"), [
    (lambda lg: lg.log_request(request_id="r1", method="POST", path="/api/v1/generate/text", status=200,
                               latency_ms=12.5, model="gemini", tokens={"input": 3, "output": 5}, cost=0.1,
                               cached=False), "api_requests.log", "request"),
    (lambda lg: lg.log_security_event(SecurityEvent("xss", "high", "query", "script"), request_id="r1",
                                      client="1.2.3.4"), "security_audit.log", "security"),
    (lambda lg: lg.log_error(RuntimeError("boom"), request_id="r1"), "api_errors.log", "error"),
    (lambda lg: lg.log_performance(request_id="r1", total_ms=10, upstream_ms=8), "performance.log", "performance"),
    (lambda lg: lg.log_cost(request_id="r1", model="gemini", total_cost=0.001), "cost_tracking.log", "cost"),
])
def test_each_method_writes_one_line_to_its_file(logger, log_dir, call, filename, event):
    call(logger)
    assert logger.flush()
    for name in LOG_FILES.values():
        written = lines(log_dir / name)
        if name != filename:
            assert written == []
            continue
        [entry] = written
        assert TS.match(entry["ts"]) and entry["event"] == event and entry["request_id"] == "r1"


def test_security_line_carries_the_event(logger, log_dir):
    logger.log_security_event(SecurityEvent("sql_injection", "medium", "body", "SQL injection pattern", 18,
                                            "0123456789abcdef"), request_id="r9", client="10.0.0.1", path="/x")
    logger.flush()
    [entry] = lines(log_dir / "security_audit.log")
    assert entry | {"ts": None} == {"ts": None, "event": "security", "type": "sql_injection", "severity": "medium",
                                    "location": "body", "detail": "SQL injection pattern", "match_length": 18,
                                    "match_sha256": "0123456789abcdef", "request_id": "r9", "client": "10.0.0.1",
                                    "path": "/x"}


def test_unicode_is_written_as_is(logger, log_dir):
    logger.log_request(request_id="r1", note="héllo 世界")
    logger.flush()
    assert "héllo 世界" in (log_dir / "api_requests.log").read_text(encoding="utf-8")


def test_concurrent_threads_write_complete_lines(logger, log_dir):
    threads, per_thread = 8, 250
    start = threading.Barrier(threads)

    def work(n: int) -> None:
        start.wait()
        for i in range(per_thread):
            logger.log_request(request_id=f"{n}-{i}", payload="x" * 100)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    logger.flush()
    written = lines(log_dir / "api_requests.log")
    assert len(written) == threads * per_thread
    assert len({entry["request_id"] for entry in written}) == threads * per_thread


def test_rotation_keeps_backup_count_files(log_dir):
    with RequestLogger(log_dir, max_bytes=1024, backup_count=2, console=False) as logger:
        for i in range(100):
            logger.log_request(request_id=f"r{i}", payload="y" * 60)
    names = {p.name for p in log_dir.iterdir()}
    assert {"api_requests.log", "api_requests.log.1", "api_requests.log.2"} <= names
    assert "api_requests.log.3" not in names
    for name in ("api_requests.log", "api_requests.log.1", "api_requests.log.2"):
        assert (log_dir / name).stat().st_size <= 1024
        assert all(entry["event"] == "request" for entry in lines(log_dir / name))
    assert lines(log_dir / "api_requests.log")[-1]["request_id"] == "r99"


def test_rotation_counts_bytes_across_restarts_and_multibyte_text(log_dir):
    for start in (0, 30):  # the second logger opens a file that already holds lines
        with RequestLogger(log_dir, max_bytes=1024, backup_count=30, console=False) as logger:
            for i in range(start, start + 30):
                logger.log_request(request_id=f"r{i}", payload="é€" * 30)  # 2 and 3 bytes a character
    files = sorted(log_dir.glob("api_requests.log*"))
    assert len(files) > 3 and all(path.stat().st_size <= 1024 for path in files)
    assert sum(len(lines(path)) for path in files) == 60


def test_log_paths_linked_to_a_pipe_or_dev_null_are_written_not_rotated(log_dir):
    import os

    log_dir.mkdir(parents=True)
    os.mkfifo(log_dir / "api_requests.log")  # what `ln -s /dev/stdout` gives a container: not seekable
    (log_dir / "performance.log").symlink_to(os.devnull)
    received = []
    reader = threading.Thread(target=lambda: received.extend(open(log_dir / "api_requests.log").readlines()))
    reader.start()
    with RequestLogger(log_dir, max_bytes=300, backup_count=2, console=False) as logger:
        for i in range(20):
            logger.log_request(request_id=f"r{i}", payload="z" * 60)
            logger.log_performance(request_id=f"r{i}", total_ms=1.0, payload="z" * 60)
    reader.join(timeout=10)
    assert [json.loads(line)["request_id"] for line in received] == [f"r{i}" for i in range(20)]
    assert (log_dir / "performance.log").is_symlink()
    assert not (log_dir / "performance.log.1").exists() and not (log_dir / "api_requests.log.1").exists()


def test_a_rollover_that_cannot_reopen_its_file_deletes_no_backup_and_the_file_comes_back(log_dir):
    """Found by attack: when a rollover renamed the file but could not open a new one (no descriptor left, a
    folder replaced), every later line rotated again, shifting the backups and deleting one each time (five lines
    wiped five backups), or, if it fit, was lost to a file that was never reopened."""
    import errno

    from gateway.observability.log_writer import JsonLinesFile

    log_dir.mkdir(parents=True)
    file = JsonLinesFile(log_dir / "api_requests.log", max_bytes=300, backup_count=3)

    def line(n: int) -> str:
        return json.dumps({"n": n, "pad": "x" * 50})

    for n in range(12):  # four lines a file: the file and three backups, all full
        file.write_line(line(n))
    file.flush()
    opened = file._open

    def no_descriptor():
        raise OSError(errno.EMFILE, "Too many open files")

    file._open = no_descriptor
    for n in range(100, 110):  # the first rotates (as it should), then cannot reopen; so does every later one
        with pytest.raises(OSError):
            file.write_line(line(n))
    file._open = opened
    for n in range(200, 202):
        file.write_line(line(n))
    file.close()
    numbers = {path.name: [entry["n"] for entry in lines(path)] for path in log_dir.iterdir()}
    assert numbers == {"api_requests.log": [200, 201], "api_requests.log.1": [8, 9, 10, 11],
                       "api_requests.log.2": [4, 5, 6, 7], "api_requests.log.3": [0, 1, 2, 3]}


# --- one item per finished request ------------------------------------------------------


REQUEST = {"request_id": "r1", "method": "POST", "path": "/api/v1/generate/text", "status": 200, "latency_ms": 3.2,
           "client": "127.0.0.1", "model": "gemini", "cached": False}
PERFORMANCE = {"request_id": "r1", "path": "/api/v1/generate/text", "total_ms": 3.2, "upstream_ms": 2.5,
               "cache_lookup_ms": 0.01}
COST = {"request_id": "r1", "model": "gemini", "input_tokens": 3, "output_tokens": 5, "total_cost": 0.001}


def every_file(log_dir: Path) -> dict[str, list[dict]]:
    return {name: lines(log_dir / name) for name in LOG_FILES.values()}


def without_ts(entries: list[dict]) -> list[dict]:
    assert all(TS.match(entry["ts"]) for entry in entries)
    return [{key: value for key, value in entry.items() if key != "ts"} for entry in entries]


def test_a_finished_request_is_exactly_its_lines_in_their_files(logger, log_dir):
    logger.log_finished(dict(REQUEST), dict(PERFORMANCE), dict(COST))
    logger.log_finished({**REQUEST, "request_id": "r2", "status": 404})  # no answer: no performance, no cost
    assert logger.flush()
    written = every_file(log_dir)
    assert without_ts(written["api_requests.log"]) == [{"event": "request", **REQUEST},
                                                       {"event": "request", **REQUEST, "request_id": "r2",
                                                        "status": 404}]
    assert without_ts(written["performance.log"]) == [{"event": "performance", **PERFORMANCE}]
    assert without_ts(written["cost_tracking.log"]) == [{"event": "cost", **COST}]
    assert written["api_errors.log"] == written["security_audit.log"] == []
    stamps = {entry["ts"] for name in ("api_requests.log", "performance.log", "cost_tracking.log")
              for entry in written[name] if entry["request_id"] == "r1"}
    assert len(stamps) == 1  # one item, one moment: the time the request thread queued it


def test_a_finished_requests_lines_are_redacted_on_the_writer(logger, log_dir):
    logger.log_finished({**REQUEST, "headers": {"Authorization": f"Bearer {BEARER}"},
                         "prompt": {"length": 30, "text": f"my key is {SECRET}"}, "user_agent": f"app/{SECRET}"},
                        {**PERFORMANCE, "note": f"Bearer {BEARER}"}, {**COST, "api_key": "k-123456"})
    assert logger.flush()
    text = all_text(log_dir)
    for leaked in (SECRET, BEARER, "k-123456"):
        assert leaked not in text
    [request] = lines(log_dir / "api_requests.log")
    assert request["headers"] == {"Authorization": REDACTED}
    assert request["prompt"]["text"] == f"my key is {REDACTED}" and request["user_agent"] == f"app/{REDACTED}"
    assert lines(log_dir / "cost_tracking.log")[0]["api_key"] == REDACTED


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


@pytest.mark.parametrize("bad", [{(1, 2): "a tuple key JSON refuses"}, Unprintable()])
def test_a_line_that_cannot_be_written_leaves_a_stand_in_and_the_writer_goes_on(logger, log_dir, bad, caplog):
    logger.log_finished({**REQUEST, "bad": bad}, dict(PERFORMANCE), dict(COST))
    logger.log_request(request_id="r2", bad=bad)
    for i in range(3, 6):
        logger.log_finished({**REQUEST, "request_id": f"r{i}"}, {**PERFORMANCE, "request_id": f"r{i}"})
    assert logger.flush()
    assert logger._writer._thread.is_alive()
    requests_log = lines(log_dir / "api_requests.log")
    assert [entry["request_id"] for entry in requests_log] == ["r1", "r2", "r3", "r4", "r5"]
    for stand_in in requests_log[:2]:
        assert stand_in["event"] == "request" and stand_in["log_error"].endswith("could not be written")
        assert "bad" not in stand_in
    assert [entry["request_id"] for entry in lines(log_dir / "performance.log")] == ["r1", "r3", "r4", "r5"]
    assert [entry["request_id"] for entry in lines(log_dir / "cost_tracking.log")] == ["r1"]
    assert "could not be encoded" in caplog.text


class Gate:
    """A field whose str() (what the redactor asks of an unknown type) holds the writer thread until opened."""

    def __init__(self) -> None:
        self.reached, self.opened = threading.Event(), threading.Event()

    def __str__(self) -> str:
        self.reached.set()
        assert self.opened.wait(10)
        return "gate"


def hold_the_writer(logger: RequestLogger) -> Gate:
    gate = Gate()
    logger.log_request(request_id="gate", held=gate)
    assert gate.reached.wait(10)
    return gate


def test_flush_waits_for_every_line_queued_before_it(logger, log_dir):
    gate = hold_the_writer(logger)
    for i in range(300):
        logger.log_finished({**REQUEST, "request_id": f"r{i}"}, {**PERFORMANCE, "request_id": f"r{i}"})
    assert logger.flush(timeout=0.05) is False  # the writer is held: not written yet, and flush says so
    gate.opened.set()
    assert logger.flush() is True
    assert len(lines(log_dir / "api_requests.log")) == 301 and len(lines(log_dir / "performance.log")) == 300


def test_flush_and_close_cut_the_writers_linger_short(log_dir):
    """After writing what it found the writer waits before looking again (requests' items gather meanwhile);
    flush() and close() must not wait that out."""
    import time

    from gateway.observability.log_writer import LogWriter

    log_dir.mkdir(parents=True)
    writer = LogWriter(log_dir, redactor=Redactor(), max_bytes=0, backup_count=0, linger=60)
    started = time.monotonic()
    for i in range(3):
        writer.put((time.time(), "requests", {"request_id": f"r{i}"}))
        assert writer.flush(timeout=10) is True
    writer.put((time.time(), "requests", {"request_id": "last"}))
    writer.close()
    assert time.monotonic() - started < 10
    assert [entry["request_id"] for entry in lines(log_dir / "api_requests.log")] == ["r0", "r1", "r2", "last"]


def test_close_drains_what_is_queued(log_dir):
    logger = RequestLogger(log_dir, console=False)
    gate = hold_the_writer(logger)
    for i in range(200):
        logger.log_finished({**REQUEST, "request_id": f"r{i}"}, None, {**COST, "request_id": f"r{i}"})
    gate.opened.set()
    logger.close()
    assert not logger._writer._thread.is_alive()
    assert len(lines(log_dir / "api_requests.log")) == 201 and len(lines(log_dir / "cost_tracking.log")) == 200


def test_the_queue_holds_the_errors_text_not_the_exception(logger, log_dir):
    """A queued exception would keep its traceback's frames (and their locals) alive until written."""
    import gc
    import weakref

    class Traced(ValueError):  # builtin exceptions take no weak references; a subclass does
        pass

    def fail() -> Traced:
        try:
            raise Traced("upstream failed") from raise_chain()
        except Traced as exc:
            return exc

    gate = hold_the_writer(logger)
    exc = fail()
    alive = weakref.ref(exc)
    logger.log_error(exc, request_id="r1", status=500)
    del exc
    gc.collect()
    assert alive() is None  # queued, not yet written, and already gone
    gate.opened.set()
    assert logger.flush()
    [entry] = lines(log_dir / "api_errors.log")
    assert entry["error_type"].endswith("Traced") and entry["message"] == "upstream failed"
    assert [link["message"] for link in entry["chain"]] == ["upstream failed", "outer", "middle", "'inner'"]
    assert "in fail" in entry["traceback"] and "raise_chain" in entry["traceback"]


# --- secrets -----------------------------------------------------------------------------


def test_secrets_never_reach_files_or_console(log_dir, capsys):
    with RequestLogger(log_dir, console=True, secrets=[SECRET, "", "abc"]) as logger:
        logger.log_request(request_id="r1", method="GET", path=f"/x?key={SECRET}", status=500, client=SECRET,
                           headers={"Authorization": f"Bearer {BEARER}", "X-Api-Key": "plain-key-value"},
                           nested={"deep": [{"note": f"uses {SECRET} here"}], "api_key": "k-123456"},
                           message=f"upstream said Authorization: Bearer {BEARER}", label="abc")
        logger.log_cost(request_id="r1", detail=(f"cost for {SECRET}",))
        logger.log_finished({"request_id": "r2", "method": "GET", "path": f"/y?key={SECRET}", "status": 502,
                             "client": SECRET}, {"request_id": "r2", "note": SECRET}, {"request_id": "r2",
                                                                                        "client": SECRET})
        try:
            try:
                raise PermissionError(f"key {SECRET} rejected")
            except PermissionError as exc:
                raise RuntimeError(f"headers={{'Authorization': 'Bearer {BEARER}'}}") from exc
        except RuntimeError as exc:
            logger.log_error(exc, request_id="r1", context={"password": "hunter22"})
    console = capsys.readouterr().err
    text = all_text(log_dir) + console
    for leaked in (SECRET, BEARER, "plain-key-value", "k-123456", "hunter22"):
        assert leaked not in text
    assert REDACTED in text
    assert f"GET /y?key={REDACTED} 502" in console and f"client={REDACTED}" in console
    assert '"label":"abc"' in text  # secrets shorter than 4 characters are ignored
    request = lines(log_dir / "api_requests.log")[0]
    assert request["headers"] == {"Authorization": REDACTED, "X-Api-Key": REDACTED}
    assert request["nested"]["deep"][0]["note"] == f"uses {REDACTED} here"


@pytest.mark.parametrize("key", ["Authorization", "x-api-key", "X-Goog-Api-Key", "GOOGLE_API_KEY", "db_password",
                                 "refresh_token", "Cookie", "Set-Cookie", "secret", "token"])
def test_sensitive_keys_are_redacted(logger, key):
    assert logger.redact({key: "value", "keep": 1}) == {key: REDACTED, "keep": 1}


@pytest.mark.parametrize("key", ["tokens", "input_tokens", "model", "request_id", "path"])
def test_ordinary_keys_are_kept(logger, key):
    assert logger.redact({key: "value"}) == {key: "value"}


def test_redact_free_text(logger):
    assert logger.redact(f"a {SECRET} b") == f"a {REDACTED} b"
    assert BEARER not in logger.redact(f"sent Bearer {BEARER}")
    assert "AIza" not in logger.redact("url ?key=AIzaSyA1234567890abcdefghijklmnopqrstuv")
    assert logger.redact("Write a short story about a robot") == "Write a short story about a robot"


# --- prompts and errors ------------------------------------------------------------------


def test_describe_prompt_hashes_unless_full_logging(log_dir):
    with RequestLogger(log_dir, console=False) as hashed, RequestLogger(log_dir / "full", console=False,
                                                                        log_full_prompts=True) as full:
        described = hashed.describe_prompt("hello world")
        assert described == {"length": 11, "sha256": "b94d27b9934d3e08"}
        assert full.describe_prompt("hello world") == {"length": 11, "text": "hello world"}


def test_log_error_records_the_chain_and_traceback(logger, log_dir):
    logger.log_error(raise_chain(), request_id="r1", status=500)
    logger.flush()
    [entry] = lines(log_dir / "api_errors.log")
    assert entry["error_type"] == "ValueError" and entry["message"] == "outer" and entry["status"] == 500
    assert entry["chain"] == [{"type": "ValueError", "message": "outer"},
                              {"type": "ConnectionError", "message": "middle"},
                              {"type": "KeyError", "message": "'inner'"}]
    assert "Traceback" in entry["traceback"] and "raise_chain" in entry["traceback"]


def test_log_error_respects_from_none(logger, log_dir):
    try:
        try:
            raise KeyError("hidden")
        except KeyError:
            raise ValueError("shown") from None
    except ValueError as exc:
        logger.log_error(exc, request_id="r1")
    logger.flush()
    assert [link["type"] for link in lines(log_dir / "api_errors.log")[0]["chain"]] == ["ValueError"]


# --- lifecycle ---------------------------------------------------------------------------


def test_close_writes_everything_queued_and_is_idempotent(log_dir):
    logger = RequestLogger(log_dir, console=False)
    for i in range(500):
        logger.log_performance(request_id=f"r{i}", total_ms=i)
    logger.close()
    logger.close()
    assert len(lines(log_dir / "performance.log")) == 500
    logger.log_performance(request_id="late", total_ms=1)  # ignored after close
    assert logger.flush() is True
    assert len(lines(log_dir / "performance.log")) == 500


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_close_never_raises_when_a_file_cannot_be_flushed(log_dir, caplog):
    """Found by attack: a log file on a full disk made close() raise from its final flush, so the files after it
    stayed open and `Gateway.close()` never reached the ledger, keys and budgets behind the logger."""
    log_dir.mkdir(parents=True)
    (log_dir / "performance.log").symlink_to("/dev/full")  # every write to it fails: ENOSPC
    logger = RequestLogger(log_dir, console=False)
    for i in range(500):  # more than the file's write buffer holds
        logger.log_finished({**REQUEST, "request_id": f"r{i}"},
                            {**PERFORMANCE, "request_id": f"r{i}", "pad": "p" * 100}, {**COST, "request_id": f"r{i}"})
    logger.close()  # must not raise
    assert all(file.stream is None for file in logger._writer.files.values())  # every file closed
    assert len(lines(log_dir / "api_requests.log")) == len(lines(log_dir / "cost_tracking.log")) == 500
    assert "performance.log" in caplog.text


def test_instances_write_only_to_their_own_directory(tmp_path):
    with RequestLogger(tmp_path / "a", console=False) as a, RequestLogger(tmp_path / "b", console=False) as b:
        a.log_request(request_id="from-a")
        b.log_request(request_id="from-b")
        b.log_cost(request_id="from-b")
        a.flush()
        b.flush()
        assert [e["request_id"] for e in lines(tmp_path / "a" / "api_requests.log")] == ["from-a"]
        assert [e["request_id"] for e in lines(tmp_path / "b" / "api_requests.log")] == ["from-b"]
        assert lines(tmp_path / "a" / "cost_tracking.log") == []


def test_console_shows_only_summaries_at_its_level(log_dir, capsys):
    with RequestLogger(log_dir, console=True, console_level="WARNING") as logger:
        logger.log_request(request_id="ok-1", method="GET", path="/health", status=200, latency_ms=1)
        logger.log_request(request_id="bad-1", method="POST", path="/api/v1/generate/text", status=502, latency_ms=9)
        logger.log_error(RuntimeError("upstream\nfailed"), request_id="bad-1")
        logger.log_performance(request_id="bad-1", total_ms=9)
        logger.log_cost(request_id="bad-1", total_cost=0.0)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert "POST /api/v1/generate/text 502 9ms" in err[0] and "request_id=bad-1" in err[0]
    assert "RuntimeError: upstream failed" in err[1]


def test_console_off_prints_nothing(log_dir, capsys):
    with RequestLogger(log_dir, console=False) as logger:
        logger.log_request(request_id="r1", status=500)
    assert capsys.readouterr().err == ""


# --- linear-time redaction ---------------------------------------------------------------


def test_redaction_patterns_run_on_re2():
    """The class fix for issue 8's 38-52 s freeze: every credential pattern is RE2 (linear time), none is `re`."""
    import re2

    import enhanced_logging

    patterns = [enhanced_logging._MAYBE_CREDENTIAL, *(p for p, _ in enhanced_logging._CREDENTIAL_PATTERNS)]
    assert all(isinstance(pattern, re2._Regexp) for pattern in patterns)


SPACES = " " * 60_000


@pytest.mark.parametrize(("text", "expected"), [
    (f"/key{SPACES}x", f"/key{SPACES}x"),  # the URL that froze the process: nothing to redact, and it returns
    (f"key{SPACES}= hunter22x", f"key{SPACES}= {REDACTED}"),
    (f"password:{chr(0xA0) * 1000}hunter22", f"password:{chr(0xA0) * 1000}{REDACTED}"),  # Unicode spaces as before
    (f"Bearer{SPACES}", f"Bearer{SPACES}"),
    ("token=" * 20_000, f"token={REDACTED}"),
    (f"{'a' * 50_000} {SECRET} {'b' * 50_000}", f"{'a' * 50_000} {REDACTED} {'b' * 50_000}"),
])
def test_long_adversarial_texts_are_redacted_correctly(logger, text, expected):
    assert logger.redact(text) == expected


def test_text_with_a_lone_surrogate_is_still_redacted(logger):
    assert logger.redact("bad \udc80 byte, api_key=plain-value") == f"bad \\udc80 byte, api_key={REDACTED}"


def test_redactor_with_secrets_adds_only_new_ones():
    first = Redactor(["first-secret"])
    assert first.with_secrets(["first-secret", "", "ab"]) is first
    both = first.with_secrets(["second-secret"])
    assert both.redact_text("first-secret second-secret") == f"{REDACTED} {REDACTED}"


@pytest.mark.parametrize("text", [
    "api_key=abcdef123", "X-API-KEY: abc", "\u212aey=abc", "paſſword: hunter22", "ſecret=abc", "TOKEN = 'abc'",
    "Authorization: Basic dXNlcjpwYXNz", "bearer abcdefghijklmnopq", "AIza" + "x" * 35, "mtk_" + "y" * 30,
    "passwd=x", "a plain sentence with no credential", "request 0123456789abcdef", JWT, f"x{JWT}",
    "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
])
def test_the_plain_word_prefilter_never_skips_what_the_patterns_would_redact(text):
    """The word check before the RE2 patterns is only a shortcut: it must pass every text they would change."""
    import enhanced_logging

    changed_by_patterns = any(pattern.sub(replacement, text) != text
                              for pattern, replacement in enhanced_logging._CREDENTIAL_PATTERNS)
    passes_prefilter = any(word in text.casefold() for word in enhanced_logging._CREDENTIAL_WORDS)
    assert passes_prefilter or not changed_by_patterns
    assert (enhanced_logging.Redactor().redact_text(text) != text) == changed_by_patterns


@pytest.mark.parametrize("text", [f"/api/v1/keys/{JWT}", f"my token is {JWT}.", f"x{JWT}", JWT,
                                  JWT.rsplit(".", 1)[0] + "."])  # alg "none": no signature
def test_a_jwt_anywhere_in_a_text_is_redacted(text):
    """Found by attack: a client's bearer JWT in a URL path (the 404 line and its console summary), an
    X-Request-ID (client_request_id, in the request and cost lines) or a prompt (LOG_FULL_PROMPTS) was
    written as is: no rule knew its shape, only `Bearer <token>` and `token=<token>`."""
    from enhanced_logging import Redactor

    clean = Redactor().redact_text(text)
    assert REDACTED in clean
    for part in JWT.split("."):
        assert part not in clean


def test_a_finished_requests_jwt_never_reaches_the_files_or_console(log_dir, capsys):
    with RequestLogger(log_dir, console=True) as logger:
        logger.log_finished({**REQUEST, "path": f"/api/v1/{JWT}", "status": 404, "client_request_id": JWT,
                             "prompt": {"length": 400, "text": f"decode {JWT} for me"}},
                            None, {**COST, "client_request_id": JWT})
    text = all_text(log_dir) + capsys.readouterr().err
    assert JWT.split(".")[1] not in text and text.count(REDACTED) >= 4


def test_a_key_glued_to_a_word_is_still_redacted():
    """Found by attack: `\\bmtk_...` missed `/api/v1/x_mtk_...` and `User-Agent: appmtk_...`."""
    from enhanced_logging import Redactor

    client_key, google_key = "mtk_" + "Q" * 43, "AIza" + "Z" * 35
    for text in (f"/api/v1/x_{client_key}", f"app{client_key}", f"id{google_key}", f"_{google_key}"):
        clean = Redactor().redact_text(text)
        assert client_key not in clean and google_key not in clean and REDACTED in clean

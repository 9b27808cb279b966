"""The daemon's log: journald priorities, library records through structlog, container output lines."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import structlog

from ghost_buildpackd.joblog import JobLog, OutputCollector
from ghost_buildpackd.logs import configure_logging, get_logger


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[IO[str]]:
    with (tmp_path / "daemon.log").open("w+", buffering=1) as stream:
        yield stream
    configure_logging("json", "info")  # back to standard error for the tests after this one


def lines(stream: IO[str]) -> list[str]:
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


def journal_stream_of(stream: IO[str]) -> str:
    stat = os.fstat(stream.fileno())
    return f"{stat.st_dev}:{stat.st_ino}"


def test_levels_carry_journald_priorities_when_the_stream_is_the_journal(
    log_file: IO[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream_of(log_file))
    configure_logging("json", "debug", log_file)
    log = get_logger("t")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("x")
    logging.getLogger("pylxd").error("library %s", "failure")
    found = lines(log_file)
    prefixes = [line[: line.index(">") + 1] for line in found]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<3>", "<3>"]
    events = [json.loads(line[3:]) for line in found]
    assert [e["event"] for e in events] == ["d", "i", "w", "e", "x", "library failure"]
    assert "ValueError: boom" in events[4]["exception"]


@pytest.mark.parametrize("journal_stream", [None, "1:1", "not-a-pair"])
def test_no_priority_prefix_unless_the_stream_is_the_journal(
    log_file: IO[str], monkeypatch: pytest.MonkeyPatch, journal_stream: str | None
) -> None:
    """Another process's journal stream (a shell started from a unit, say) is not ours: plain JSON."""
    if journal_stream is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    else:
        monkeypatch.setenv("JOURNAL_STREAM", journal_stream)
    configure_logging("json", "info", log_file)
    get_logger("t").warning("w")
    (line,) = lines(log_file)
    assert json.loads(line)["event"] == "w"


def test_library_records_are_structured_lines_and_quiet_below_warning(log_file: IO[str]) -> None:
    configure_logging("json", "debug", log_file)
    configure_logging("json", "debug", log_file)  # configuring again replaces the handler, never stacks it
    logging.getLogger("ws4py").info("chatter")
    logging.getLogger("pylxd.client").warning("connection to %s lost", "lxd")
    (line,) = lines(log_file)
    event = json.loads(line)
    assert event["event"] == "connection to lxd lost"
    assert event["level"] == "warning"
    assert event["logger"] == "pylxd.client"
    assert "timestamp" in event


def test_lines_of_the_daemon_and_of_libraries_written_at_once_stay_one_per_line(log_file: IO[str]) -> None:
    """Each line is written whole: a library's warning (urllib3's, from an LXD call in another thread) never lands
    inside a line of the daemon's own (seen in a benchmark's log: two JSON objects on one line)."""
    configure_logging("json", "info", log_file)
    count = 1500

    def ours() -> None:
        for i in range(count):
            get_logger("test").info("ours", i=i)

    def library() -> None:
        for i in range(count):
            logging.getLogger("urllib3.connectionpool").warning("Connection pool is lost: %d", i)

    threads = [threading.Thread(target=target) for target in (ours, library, ours, library)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two writes, as on a loaded host
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    written = lines(log_file)
    assert len(written) == 4 * count
    assert sorted({json.loads(line)["event"][:4] for line in written}) == ["Conn", "ours"]


def test_urllib3s_full_pool_notices_are_dropped_and_its_other_warnings_kept(log_file: IO[str]) -> None:
    configure_logging("json", "info", log_file)
    pool = logging.getLogger("urllib3.connectionpool")
    pool.warning("Connection pool is full, discarding connection: %s. Connection pool size: %s", "localhost", 1)
    pool.warning("Retrying (Retry(total=2)) after connection broken")
    assert [json.loads(line)["event"] for line in lines(log_file)] == [
        "Retrying (Retry(total=2)) after connection broken"
    ]


def test_container_output_is_debug_and_carries_the_step(log_file: IO[str], tmp_path: Path) -> None:
    """Output arrives on LXD's reader thread, where the step's context variables are not set."""
    configure_logging("json", "debug", log_file)
    job_log = JobLog(tmp_path, "job1", "container buildimage")
    with structlog.contextvars.bound_contextvars(job_id="job1", step="job1:buildimage"):
        collector = OutputCollector(job_log, get_logger("steps"), head_bytes=1 << 20, tail_bytes=1024)
    reader = threading.Thread(target=collector, args=(b"hello\nworld\n",))
    reader.start()
    reader.join()
    collector.finish()
    outputs = [event for event in map(json.loads, lines(log_file)) if event["event"] == "output"]
    assert [(e["line"], e["level"], e["job_id"], e["step"]) for e in outputs] == [
        ("hello", "debug", "job1", "job1:buildimage"),
        ("world", "debug", "job1", "job1:buildimage"),
    ]
    assert (tmp_path / "job1.txt").read_text() == "[container buildimage] hello\n[container buildimage] world\n"


def test_container_output_stays_out_of_an_info_log(log_file: IO[str], tmp_path: Path) -> None:
    configure_logging("json", "info", log_file)
    collector = OutputCollector(JobLog(tmp_path, "job2", "container deploy web"), get_logger("s"), 1 << 20, 1024)
    collector(b"a line\n")
    collector.finish()
    assert lines(log_file) == []
    assert (tmp_path / "job2.txt").read_text() == "[container deploy web] a line\n"

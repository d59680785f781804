"""The tests' log capture keeps the calling thread's lines and drops the others': the
session's operator and gateway log from threads of their own while a test captures."""

import threading

import structlog
from structlog.testing import capture_logs

from tests.stack import this_thread_only


def test_a_capture_keeps_its_own_threads_lines_alone() -> None:
    log = structlog.get_logger()
    with capture_logs(processors=[this_thread_only()]) as logs:
        log.info("mine")
        other = threading.Thread(target=lambda: log.warning("theirs"))
        other.start()
        other.join()
        log.info("mine_again")
    assert [e["event"] for e in logs] == ["mine", "mine_again"]

"""Session-wide checks."""

import threading

import pytest


@pytest.fixture(autouse=True, scope="session")
def no_thread_outlives_the_tests():
    """A leaked non-daemon thread (for example an unclosed libsql client's event loop) would
    keep the test process alive forever after the last test; fail loudly instead."""
    yield
    leaked = [t.name for t in threading.enumerate()
              if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    assert not leaked, f"threads left running after the tests (an unclosed client?): {leaked}"

"""A pytest plugin that turns a hung test into a failure with every thread's stack, instead of a silent run
until CI's own limit (90 minutes, with no output at all).

Each test (setup, call and teardown) gets ``KV_LIFECYCLE_TEST_HANG_S`` seconds (default 1200: the whole suite
takes about 10 minutes).  Past that, faulthandler's own C thread (it needs no GIL, so a C++ call that holds it
while it waits is caught too) writes the stacks of every thread to the terminal's stderr and exits the
process with status 1.  This bounds a hang; it asserts nothing about speed.  The traceback names the test,
and its seeds are in its source (the fault-seed report section needs Python, which a hang may not give back).
"""

from __future__ import annotations

import faulthandler
import os
import sys

import pytest

_FD: list[int] = []


def hang_seconds() -> float:
    raw = os.environ.get("KV_LIFECYCLE_TEST_HANG_S", "1200")
    try:
        s = float(raw)
    except ValueError:
        raise pytest.UsageError(f"KV_LIFECYCLE_TEST_HANG_S: expected seconds > 0, got {raw!r}") from None
    if not 0 < s < 1e7:
        raise pytest.UsageError(f"KV_LIFECYCLE_TEST_HANG_S: expected seconds > 0 and < 1e7, got {raw!r}")
    return s


def pytest_configure(config):
    # the real stderr, taken while output capture is suspended: under capture, fd 2 is a temporary file that
    # the exit would throw away
    config._kv_hang_s = hang_seconds()
    _FD.append(os.dup(sys.__stderr__.fileno()))


def pytest_unconfigure(config):
    faulthandler.cancel_dump_traceback_later()
    while _FD:
        os.close(_FD.pop())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    os.write(_FD[-1], b"")  # fails loudly here, not silently at the deadline, should the fd be gone
    faulthandler.dump_traceback_later(item.config._kv_hang_s, exit=True, file=_FD[-1])
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()

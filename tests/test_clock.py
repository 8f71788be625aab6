"""The engine's default clock is CLOCK_MONOTONIC, whichever source reads it.

SteadyClock reads the TSC where the kernel trusts it and re-anchors to CLOCK_MONOTONIC (see
cpp/src/clock.cpp); LIFECYCLE_CLOCK=monotonic forces clock_gettime.  Either way every reading must
fall between the time.monotonic_ns() readings taken just before and after it.  (Accuracy of a
clock, not a timing: nothing here depends on how fast the machine is.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from lifecycle import TransferEngine, _core

TOL_NS = 20_000  # the clock tracks CLOCK_MONOTONIC to about a microsecond


def bracket_violations(read, samples: int = 20_000) -> tuple[int, int]:
    """(checked, violations): readings outside [before - TOL, after + TOL]; wide brackets skipped."""
    checked = bad = 0
    global LAST_WORST_NS
    LAST_WORST_NS = 0  # the largest distance outside the bracket (a failure's message names it)
    for _ in range(samples):
        a = time.monotonic_ns()
        e = read()
        b = time.monotonic_ns()
        if b - a > 50_000:  # the thread lost its CPU between the reads: says nothing
            continue
        checked += 1
        bad += not (a - TOL_NS <= e <= b + TOL_NS)
        LAST_WORST_NS = max(LAST_WORST_NS, a - e, e - b)
    return checked, bad


LAST_WORST_NS = 0


def test_steady_clock_is_clock_monotonic():
    assert _core.steady_source() in ("tsc", "monotonic")
    clock = _core.SteadyClock()
    checked, bad = bracket_violations(clock.now_ns)
    assert checked > 1000 and bad == 0, f"{bad} of {checked} outside by up to {LAST_WORST_NS} ns"
    # the engine's own clock is the same
    checked, bad = bracket_violations(TransferEngine().now_ns, 2000)
    assert checked > 100 and bad == 0, f"{bad} of {checked} outside by up to {LAST_WORST_NS} ns"


def test_bracket_check_catches_a_clock_off_by_a_millisecond():
    """Negative control: the same check fails for a clock 1 ms behind CLOCK_MONOTONIC."""
    checked, bad = bracket_violations(lambda: time.monotonic_ns() - 1_000_000, 2000)
    assert checked > 100 and bad == checked


def test_forced_monotonic_source():
    code = ("from lifecycle import _core; import time; c = _core.SteadyClock(); a = time.monotonic_ns(); "
            "e = c.now_ns(); b = time.monotonic_ns(); print(_core.steady_source(), a <= e <= b)")
    env = dict(os.environ, LIFECYCLE_CLOCK="monotonic")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["monotonic", "True"]

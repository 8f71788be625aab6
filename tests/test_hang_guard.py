"""tests/hang_guard.py: a hung test ends the run with every thread's stack and status 1, instead of a silent run
until CI's limit.  Each case runs pytest in a subprocess on a file of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_pytest(tmp_path: Path, body: str, hang_s: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_case.py").write_text(body)
    env = dict(os.environ, KV_LIFECYCLE_TEST_HANG_S=hang_s)
    # the outer timeout only keeps this test from hanging should the guard not work
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "hang_guard", "-q", "-p", "no:cacheprovider",
                           f"--rootdir={tmp_path}", "-o", f"pythonpath={TESTS}", str(tmp_path / "test_case.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_hung_test_ends_the_run_with_its_stack(tmp_path):
    r = run_pytest(tmp_path, "import threading\n\ndef test_waits_forever():\n    threading.Event().wait()\n", "1")
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Timeout (0:00:01)!" in r.stderr
    assert "in test_waits_forever" in r.stderr  # the hung test, named by its frame


def test_a_test_within_the_bound_is_untouched(tmp_path):
    # control: the same guard, a test that returns (and one that sleeps past nothing)
    r = run_pytest(tmp_path, "import time\n\ndef test_returns():\n    time.sleep(0.01)\n", "30")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "1 passed" in r.stdout and "Timeout" not in r.stderr


def test_a_bad_bound_is_a_usage_error_naming_the_variable(tmp_path):
    for raw in ("soon", "0", "-5", "nan"):
        r = run_pytest(tmp_path, "def test_returns():\n    pass\n", raw)
        assert r.returncode == 4, (raw, r.returncode, r.stderr[-2000:])  # pytest's usage error
        assert "KV_LIFECYCLE_TEST_HANG_S" in r.stderr and repr(raw) in r.stderr

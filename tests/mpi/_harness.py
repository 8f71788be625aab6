"""Shared bits of the MPI programs in tests/mpi (each is run as ``mpiexec -n N python tests/mpi/X.py``).

Every program prints its results as one ``RESULT {json}`` line per rank; tests/test_mpi_collectives.py
parses them and asserts.  Importing this module puts the repository root on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def load_collectives():
    """``lifecycle.collectives``, even before the compiled core is built.

    The module is pure Python; when ``import lifecycle`` fails only because ``lifecycle._core`` is
    not built yet, load the package without running its ``__init__``.
    """
    try:
        from lifecycle import collectives
    except ImportError:
        import types

        pkg = types.ModuleType("lifecycle")
        pkg.__path__ = [os.path.join(ROOT, "lifecycle")]
        sys.modules["lifecycle"] = pkg
        from lifecycle import collectives
    return collectives


RESULTS_ENV = "KVLC_MPI_RESULTS"  # a folder: each rank also appends its RESULT lines to rank<N>.jsonl there


def emit(rank: int, **fields) -> None:
    """One machine-readable result line for this rank, on stdout and (when the driver names a folder in
    $KVLC_MPI_RESULTS) in a file: a program that ends the job with MPI_Abort right after emitting can lose
    stdout still in flight in mpiexec's forwarding, while a written file is in the page cache already."""
    fields["rank"] = rank
    line = "RESULT " + json.dumps(fields, sort_keys=True, default=str) + "\n"
    folder = os.environ.get(RESULTS_ENV)
    if folder:
        with open(os.path.join(folder, f"rank{rank}.jsonl"), "a") as f:
            f.write(line)
    sys.stdout.write(line)
    sys.stdout.flush()


def now() -> float:
    return time.time()

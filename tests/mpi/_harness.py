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


def emit(rank: int, **fields) -> None:
    """One machine-readable result line for this rank."""
    fields["rank"] = rank
    sys.stdout.write("RESULT " + json.dumps(fields, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def now() -> float:
    return time.time()

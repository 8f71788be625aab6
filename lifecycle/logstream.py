"""Who wrote a lifecycle event: this process's stream of events (the ``seq``, ``pid`` and ``proc`` keys).

One stream per process, shared by every engine and by the collectives, so an audit reads one gap-free ``seq``
run per process.  ``proc`` is random (63 bits): processes that share a pid (containers, pid reuse, per-rank
files from several hosts) keep their streams apart.  A forked child starts a stream of its own (seq 0, its
pid, a new ``proc``); its lines would otherwise read as its parent's stream restarting.  Pure Python: the
collectives use it where the compiled core is not built.
"""

from __future__ import annotations

import itertools
import os


class Stream:
    __slots__ = ("seq", "pid", "proc")

    def __init__(self) -> None:
        self.seq = itertools.count()  # next(seq): a line's number, taken as it is logged (a line filtered out by
        # level takes none: gaps = lost log lines)
        self.pid = os.getpid()
        self.proc = int.from_bytes(os.urandom(8), "big") >> 1


current = Stream()


def _after_fork_in_child() -> None:
    global current
    current = Stream()


os.register_at_fork(after_in_child=_after_fork_in_child)


def writes(logger, level: int) -> bool:
    """Whether ``logger`` (resolved: a lazy logger's ``bind()``) writes lines at ``level``, asked before a line
    takes its seq (a seq taken by a line the logger then drops reads as a lost line).  True where it cannot say:
    no ``is_enabled_for``, or structlog's generic BoundLogger, which proxies any name to the logger it wraps, so
    that the call raises AttributeError."""
    enabled = getattr(logger, "is_enabled_for", None)
    if enabled is None:
        return True
    try:
        return enabled(level)
    except AttributeError:
        return True

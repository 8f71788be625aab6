"""Every error the library raises.  One base class; context lives in attributes and in a one-line message.

Stdlib only: the build imports ``lifecycle.spec`` (which uses these) before ``_core`` exists.
"""

from __future__ import annotations

import sys

__all__ = [
    "CollectiveDesyncError",
    "CollectiveTimeoutError",
    "DuplicateRequest",
    "IllegalTransition",
    "InvalidArgument",
    "LifecycleError",
    "NixlUnavailable",
    "PeerDisconnected",
    "PoolExhausted",
    "RoleRefused",
    "SpecError",
    "TerminateCallbackError",
    "TransportError",
    "UnknownRequest",
]


def _shown(value) -> str:
    """``repr(value)`` for an error message, never an error itself: an int too long for repr() (past the 4300
    digits Python prints: ValueError "Exceeds the limit ...") is named by its size, and an object whose
    ``__repr__`` raises by its type.  Either error replaced the typed one that was being made.  A torch tensor
    is named by its type, shape, dtype and device, never by its values: torch's repr() reads them, and for a
    tensor whose storage was freed or shrunk under it (``untyped_storage().resize_(0)``) that read crashed the
    process (SIGSEGV) instead of raising the error."""
    torch = sys.modules.get("torch")  # (never imported here: a tensor exists only where torch is)
    try:
        if torch is not None and isinstance(value, torch.Tensor):
            return f"a {type(value).__name__} of shape {tuple(value.shape)}, dtype {value.dtype}, device {value.device}"
        return repr(value)
    except Exception:
        if isinstance(value, int):
            return f"{'a negative' if value < 0 else 'an'} int of {int.bit_length(value)} bits"
        return f"a {type(value).__name__} (its repr() raised)"


class LifecycleError(Exception):
    """Base class of every kv-lifecycle error.  Every one pickles (a process pool's worker hands it back):
    rebuilt from its message and attributes, without running the subclass's ``__init__`` again (which takes
    other arguments than the message)."""

    def __reduce__(self):
        state = dict(self.__dict__)
        if isinstance(self, ImportError):  # its own fields are slots, not in __dict__
            state.update(msg=self.msg, name=self.name, path=self.path)
        return _rebuild, (type(self), self.args, state)


def _rebuild(cls: type, args: tuple, state: dict) -> LifecycleError:
    err = cls.__new__(cls)
    err.args = args
    for k, v in state.items():
        setattr(err, k, v)
    return err


class IllegalTransition(LifecycleError):
    """``event`` is not allowed in ``state`` for ``request``; the session is unchanged."""

    def __init__(self, request: int, state: str, event: str):
        self.request, self.state, self.event = request, state, event
        super().__init__(f"can't handle event {event} when state={state} for request {request}")


class DuplicateRequest(LifecycleError):
    """advertise of a request id that already has a session."""

    def __init__(self, request: int, state: str):
        self.request, self.state = request, state
        super().__init__(f"request {request} already has a session (state={state}); advertise refused")


class UnknownRequest(LifecycleError, KeyError):
    """No session with this request id."""

    def __init__(self, request: int, event: str = ""):
        self.request, self.event = request, event
        what = f" for event {event}" if event else ""
        super().__init__(f"no session for request {request}{what}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class InvalidArgument(LifecycleError, ValueError, TypeError):
    """An argument has the wrong type, sign or size; ``argument`` names it (catch as ValueError or TypeError)."""

    def __init__(self, argument: str, message: str):
        self.argument = argument
        super().__init__(f"invalid {argument}: {message}")


class PoolExhausted(LifecycleError):
    """No free slot in the buffer pool for ``request``."""

    def __init__(self, request: int, message: str):
        self.request = request
        super().__init__(f"request {request}: {message}")


class SpecError(LifecycleError, ValueError):
    """The lifecycle table is malformed or invalid; ``violations`` lists every problem (file:line)."""

    def __init__(self, violations: list):
        self.violations = list(violations)
        head = "; ".join(str(v) for v in self.violations[:3])
        more = f" (+{len(self.violations) - 3} more)" if len(self.violations) > 3 else ""
        super().__init__(f"invalid lifecycle table: {head}{more}")


class TerminateCallbackError(LifecycleError):
    """One or more ``on_terminate`` callbacks raised; every notice of the batch was still delivered."""

    def __init__(self, errors: list[tuple[int, BaseException]]):
        self.errors = list(errors)
        self.transitions: list = []  # poll()'s: the batch it would have returned
        reqs = ", ".join(str(r) for r, _ in self.errors)
        super().__init__(f"on_terminate raised for request(s) {reqs}: {_shown(self.errors[0][1])}")


class TransportError(LifecycleError):
    """A transport (NIXL, loopback) failed."""


class PeerDisconnected(TransportError):
    """A transfer to ``peer`` refused before anything was built or exposed (the session stays Advertised: cancel it,
    and it frees now): a NIXL post to that peer failed earlier, and NIXL 1.5.1 then takes the peer for disconnected,
    so every later post to it would fail after its expose (Poisoned, its slot quarantined).  Until
    ``remove_peer(peer)`` and ``add_peer()`` of its metadata (add_peer alone does not reconnect it)."""

    peer: str


class RoleRefused(TransportError):
    """A transfer the role rule (DESIGN §9) refuses before anything is built or exposed: a bug in the caller, never
    a backend failure (reconnecting or retrying cannot help).  ``whose`` says which role refused: ``"session"``
    (the request's own session does not take ``op``: a sender WRITEs, a receiver READs) or ``"offer"`` (the
    peer's offer is of a role ``op`` does not take); ``role`` is that role, ``request`` the request id."""

    request: int
    op: str
    role: str
    whose: str


class NixlUnavailable(TransportError, ImportError):
    """libnixl_capi.so could not be loaded or lacks a symbol; the message says which and how to install."""


class CollectiveDesyncError(LifecycleError):
    """Ranks diverged: at sequence ``seq_no`` the collectives differ in ``field``; ``sites`` maps rank -> call site."""

    def __init__(self, message: str, seq_no: int = -1, field: str = "", sites: dict | None = None):
        self.seq_no, self.field, self.sites = seq_no, field, dict(sites or {})
        super().__init__(message)


class CollectiveTimeoutError(CollectiveDesyncError):
    """A collective missed its watchdog deadline; ``missing`` names the ranks that never arrived."""

    def __init__(self, message: str, seq_no: int = -1, missing: dict | None = None, sites: dict | None = None):
        self.missing = dict(missing or {})
        super().__init__(message, seq_no=seq_no, field="arrival", sites=sites)

"""kv-lifecycle: safe KV-cache transfer lifecycles for disaggregated LLM serving.

Every request's KV transfer is an explicit state machine (Advertised, InFlight, CancelRequested,
Quiesced, Poisoned, Terminated) driven by transport completion events in a C++ core.  Resources are
released only from a terminal state; an early terminate is deferred and delivered exactly once.
"""

from .engine import (
    FINAL,
    TABLE,
    TERMINAL,
    CancelResult,
    Event,
    Health,
    ManualClock,
    Outcome,
    Role,
    SessionInfo,
    State,
    Statistics,
    TerminateResult,
    TransferEngine,
    Transition,
    cancel_frees_now,
)
from .errors import (
    CollectiveDesyncError,
    CollectiveTimeoutError,
    DuplicateRequest,
    IllegalTransition,
    InvalidArgument,
    LifecycleError,
    NixlUnavailable,
    PeerDisconnected,
    PoolExhausted,
    RoleRefused,
    SpecError,
    TerminateCallbackError,
    TransportError,
    UnknownRequest,
)

from .transport import Faults, LoopbackTransport, Mem, NixlTransport, Offer, TransportStats, pool_slot

__version__ = "0.1.0"

__all__ = [
    "FINAL",
    "TABLE",
    "TERMINAL",
    "CancelResult",
    "CollectiveDesyncError",
    "CollectiveTimeoutError",
    "DuplicateRequest",
    "Event",
    "Health",
    "IllegalTransition",
    "InvalidArgument",
    "LifecycleError",
    "ManualClock",
    "NixlUnavailable",
    "Outcome",
    "PeerDisconnected",
    "PoolExhausted",
    "Role",
    "RoleRefused",
    "SessionInfo",
    "SpecError",
    "State",
    "Statistics",
    "TerminateCallbackError",
    "TerminateResult",
    "TransferEngine",
    "Transition",
    "TransportError",
    "UnknownRequest",
    "cancel_frees_now",
    "Faults",
    "LoopbackTransport",
    "Mem",
    "NixlTransport",
    "Offer",
    "TransportStats",
    "pool_slot",
]

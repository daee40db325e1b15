"""A worker's lifecycle, as the coordinator sees it: one table of (state, event) -> next state.

    joining -(hello)-> measuring -(measured)-> idle -(assign)-> loading -(loaded)-> ready
    ready or loading -(missed_deadline)-> suspect -(answered | loaded)-> ready,
        or -(answered_loading)-> loading when it answers while a load of its is still out
    (a load out is a stage's or, for a tab on trial, its trial range's: `loaded` comes with the last of them)
    loading -(refused)-> idle, or -(refused_holding)-> ready when it still holds a stage, once no load of its is out
    idle, or ready holding nothing -(remeasure)-> measuring (left out of the plan, measured again)
        -(assign)-> loading when a lost range needs it before its answer (on its last figure)
    any live state -(lost)-> dead, -(quarantined)-> quarantined (it broke the protocol or lied)

dead and quarantined are terminal: a worker that comes back is a new worker (its late results
carry a stale epoch and are ignored). `suspect` is transient (heartbeats still arrive), `dead`
permanent. A move the table does not list is the coordinator's own bug, never a peer's fault:
LocalProtocolError (h11's name for "we broke it").
"""
from __future__ import annotations

from protocol.format import ProtocolError

STATES = ("joining", "measuring", "idle", "loading", "ready", "suspect", "dead", "quarantined")
LIVE = STATES[:6]

TRANSITIONS: dict[tuple[str, str], str] = {
    ("joining", "hello"): "measuring",
    ("measuring", "measured"): "idle",
    ("idle", "remeasure"): "measuring",
    ("ready", "remeasure"): "measuring",
    ("idle", "assign"): "loading",
    ("measuring", "assign"): "loading",  # measured again only (Worker.remeasuring): Recovery._repair_stage
    ("loading", "assign"): "loading",
    ("ready", "assign"): "loading",
    ("loading", "loaded"): "ready",
    ("ready", "loaded"): "ready",
    ("suspect", "loaded"): "ready",
    ("loading", "refused"): "idle",
    ("loading", "refused_holding"): "ready",
    ("ready", "missed_deadline"): "suspect",
    ("loading", "missed_deadline"): "suspect",  # a step sent before it was given a range to load
    ("suspect", "answered"): "ready",
    ("suspect", "answered_loading"): "loading",  # (`ready` would say it serves every range it holds)
    **{(state, "lost"): "dead" for state in LIVE},
    **{(state, "quarantined"): "quarantined" for state in LIVE},
    ("dead", "lost"): "dead",  # lost twice (its socket closed after its deadline passed)
}


class LocalProtocolError(ProtocolError):
    """The coordinator tried a move its lifecycle table does not allow: a bug here, not the peer's."""

    def __init__(self, worker_id: str, state: str, event: str):
        super().__init__("illegal_transition", f"worker {worker_id}: no move from {state!r} on {event!r}")


def next_state(worker_id: str, state: str, event: str) -> str:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise LocalProtocolError(worker_id, state, event) from None

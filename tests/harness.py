"""Drives the coordinator's state machine and in-process TabWorkers with a fake clock and no
sockets: every message still goes through the real wire codec (encode + decode + validate)."""
from __future__ import annotations

from collections import deque

from coordinator.records import LOCAL, Close, CoordinatorSettings, Emit, Send

from coordinator.state import Coordinator
from protocol.blobs import pack_head, pack_layer
from tab_worker.worker import TabWorker
from protocol import wire
from model.embedding import embed


# what each in-process worker's compute takes by its clock (Net.add_worker)
COMPUTE_S = 0.001


def _fixed_compute_clock():
    """A compute clock that advances COMPUTE_S at every reading, whatever the wall time between
    two: a compute timed from its start to its end took COMPUTE_S."""
    readings = [0]

    def clock() -> float:
        readings[0] += 1
        return readings[0] * COMPUTE_S

    return clock


class Net:
    def __init__(self, weights, settings: CoordinatorSettings = CoordinatorSettings(), local: bool = False, token=None,
                 draft=None):
        self.weights = weights
        blobs = {f"layer:{i}": pack_layer(i, lw) for i, lw in enumerate(weights.layers)}
        blobs["head"] = pack_head(weights.head)
        self.core = Coordinator(weights.config, blobs, lambda ids: embed(weights.embedding, ids), settings, token, draft=draft)
        self.now = 0.0
        self.workers: dict[str, TabWorker] = {}
        self.dead: set[str] = set()  # conns whose process is gone: messages vanish
        self.frozen: set[str] = set()  # conns that neither answer nor heartbeat (held messages)
        self.held: dict[str, list] = {}
        self.closed: dict[str, tuple] = {}
        self.events: dict[str, list] = {}
        self.queue: deque = deque()  # (direction, conn, msg)
        self.sent_bytes = 0
        self._n = 0
        if local:
            self.add_worker(conn=LOCAL)

    def add_worker(self, conn: str | None = None, **kw) -> str:
        self._n += 1
        conn = conn or f"c{self._n}"
        w = TabWorker(f"tab-{self._n}", backend="numpy", **kw)
        # a device of its own whose every compute takes COMPUTE_S: its speed measurement, and
        # so the plan, are the same on a busy host as on a quiet one (timed by the wall, a CI run
        # beside other work failed a test whose plan depends on it; two workers measured 4x
        # apart fail it every time)
        w.compute_clock = _fixed_compute_clock()
        self.workers[conn] = w
        self.to_coordinator(conn, w.hello())
        return conn

    # ---------------------------------------------------------------- routing
    def to_coordinator(self, conn, m):
        self.queue.append(("up", conn, m))

    def perform(self, actions):
        for a in actions:
            if isinstance(a, Send):
                self.queue.append(("down", a.conn, a.msg))
            elif isinstance(a, Close):
                self.closed[a.conn] = (a.code, a.reason)
            elif isinstance(a, Emit):
                self.events.setdefault(a.request_id, []).append(a.event)

    def run(self, max_messages: int = 100_000, until=None):
        n = 0
        while self.queue and n < max_messages:
            if until is not None and until():
                return
            n += 1
            direction, conn, m = self.queue.popleft()
            data = wire.encode(m, validate=False)
            self.sent_bytes += len(data)
            m = wire.decode(data)
            if direction == "down":
                if conn in self.dead or conn in self.closed and conn != LOCAL and m["type"] != "error":
                    continue
                if conn in self.frozen:
                    self.held.setdefault(conn, []).append(m)
                    continue
                for r in self.workers[conn].handle(m):
                    self.to_coordinator(conn, r)
            else:
                if conn in self.dead:
                    continue
                self.perform(self.core.on_message(conn, m, self.now))

    def advance(self, seconds: float, step: float = 0.05, heartbeats: bool = True, until=None, tarpits: bool = False):
        """Move the clock; live, unfrozen workers heartbeat every `step`. tarpits: frozen ones
        heartbeat too (a tarpit tab: alive on its socket, answering nothing else)."""
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = min(end, self.now + step)
            if heartbeats:
                for conn, w in self.workers.items():
                    if (conn not in self.dead and (tarpits or conn not in self.frozen) and conn not in self.closed
                            and conn != LOCAL):
                        self.to_coordinator(conn, w.heartbeat(0))
            self.perform(self.core.tick(self.now))
            self.run(until=until)

    def advance_until(self, done, seconds: float, step: float = 0.05) -> float:
        """advance `step` at a time, every live worker heartbeating, frozen ones too (a tarpit is
        alive on its socket), until done() or `seconds`; returns the clock then."""
        end = self.now + seconds
        while not done() and self.now < end - 1e-9:
            self.advance(step, step=step, tarpits=True)
        return self.now

    def thaw(self, conn: str):
        """A frozen worker wakes: it handles every message held for it, in order."""
        self.frozen.discard(conn)
        for m in self.held.pop(conn, []):
            for r in self.workers[conn].handle(m):
                self.to_coordinator(conn, r)
        self.run()

    def kill(self, conn: str, socket_closes: bool = True):
        self.dead.add(conn)
        if socket_closes:
            self.perform(self.core.on_disconnect(conn, self.now))

    def submit(self, rid, prompt_ids, max_tokens, params=None, **kw):
        from model.sampling import SamplingParams

        self.perform(self.core.submit(rid, prompt_ids, max_tokens, params or SamplingParams(), self.now, **kw))

    def tokens(self, rid) -> list[int]:
        """The request's tokens as a client holds them: a rewind withdraws those from its index
        on; each token must come at the next index (no gap, no duplicate)."""
        out = []
        for e in self.events.get(rid, []):
            if e["type"] == "rewind":
                assert e["index"] < len(out), f"rewind to {e['index']} with {len(out)} tokens streamed"
                del out[e["index"]:]
            elif e["type"] == "token":
                assert e["index"] == len(out), f"token index {e['index']} after {len(out)} tokens"
                out.append(e["token_id"])
        return out

    def rewinds(self, rid) -> list[dict]:
        return [e for e in self.events.get(rid, []) if e["type"] == "rewind"]

    def done(self, rid) -> bool:
        return any(e["type"] in ("done", "error") for e in self.events.get(rid, []))

    def stage_conn(self, index: int) -> str:
        wid = self.core.stages[index].holders[0]
        return self.core.workers[wid].conn


def start_net(weights, n_workers: int, local: bool = False, draft=None, **settings) -> Net:
    """A coordinator with n in-process numpy workers, planned, loaded and ready to serve.
    Its workers are trusted from the start unless probation_steps is given (tests of probation
    opt in: tests/test_hostile_tabs.py), and planned as one stage each unless stages is given
    (tests of the planner's own depth choice pass stages=None: tests/test_replicas.py)."""
    settings.setdefault("probation_steps", 0)
    settings.setdefault("stages", n_workers or None)
    net = Net(weights, CoordinatorSettings(max_ctx=256, **settings), local=local, draft=draft)
    for _ in range(n_workers):
        net.add_worker()
    net.run()
    net.advance(0.5)  # calibration done, re-plan delay passed, weights streamed
    assert net.core.stages and all(s.primary in s.ready and s.primary != LOCAL for s in net.core.stages)
    return net


def run_until_done(net: Net, rids, seconds: float = 30) -> None:
    for _ in range(int(seconds / 0.05)):
        if all(net.done(r) for r in rids):
            return
        net.advance(0.05)
    raise AssertionError(f"not done: {[r for r in rids if not net.done(r)]}")

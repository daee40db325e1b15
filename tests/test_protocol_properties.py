"""Property test of the coordinator's protocol state machine (hypothesis.stateful over the
socket-free harness, tiny model): random interleavings of join / leave / kill / freeze / submit /
time keep the invariants: every greedy session's tokens are the single-worker reference, each
token index is emitted exactly once, no stage is left without a holder while a live worker can
take it, and once a worker is back every session finishes exactly."""
import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from coordinator.records import CoordinatorSettings
from tab_worker.generate import LocalGenerator
from tests.harness import Net
from tests.tiny_model import tiny_weights

WEIGHTS = tiny_weights()
PROMPTS = [[5, 17, 42, 99], [7, 123, 250, 11, 3, 9], [200, 1, 44]]
N = 8
_gen = LocalGenerator(WEIGHTS, backend="numpy", max_ctx=256)
REFERENCE = [list(_gen.generate(p, N, stop_at_eos=False)) for p in PROMPTS]


class CoordinatorMachine(RuleBasedStateMachine):
    @initialize(n=st.integers(1, 3))
    def start(self, n):
        self.net = Net(WEIGHTS, CoordinatorSettings(max_ctx=256, request_timeout_s=10_000, spot_check_fraction=0.0))
        self.sessions: dict[str, int] = {}  # request id -> prompt index
        for _ in range(n):
            self.net.add_worker()
        self.net.run()

    def live_conns(self):
        return [c for c in self.net.workers if c not in self.net.dead and c not in self.net.frozen and c not in self.net.closed]

    @precondition(lambda self: len(self.net.workers) < 7)
    @rule()
    def join(self):
        self.net.add_worker()
        self.net.run()

    @precondition(lambda self: self.live_conns())
    @rule(i=st.integers(0, 10), closes=st.booleans())
    def kill(self, i, closes):
        conns = self.live_conns()
        self.net.kill(conns[i % len(conns)], socket_closes=closes)
        self.net.run()

    @precondition(lambda self: self.live_conns())
    @rule(i=st.integers(0, 10))
    def leave(self, i):
        conns = self.live_conns()
        conn = conns[i % len(conns)]
        self.net.to_coordinator(conn, {"v": 1, "type": "bye", "reason": "closing"})
        self.net.run()
        self.net.dead.add(conn)

    @precondition(lambda self: self.live_conns())
    @rule(i=st.integers(0, 10))
    def freeze(self, i):
        conns = self.live_conns()
        self.net.frozen.add(conns[i % len(conns)])

    @precondition(lambda self: len(self.sessions) < 6)
    @rule(p=st.integers(0, len(PROMPTS) - 1))
    def submit(self, p):
        rid = f"r{len(self.sessions)}"
        self.sessions[rid] = p
        self.net.submit(rid, PROMPTS[p], N, stop_at_eos=False)
        self.net.run()

    @rule(seconds=st.sampled_from([0.05, 0.25, 1.0]))
    def advance(self, seconds):
        self.net.advance(seconds)

    @invariant()
    def tokens_exact_and_once(self):
        if not hasattr(self, "net"):
            return
        for rid, p in self.sessions.items():
            evs = [e for e in self.net.events.get(rid, []) if e["type"] == "token"]
            assert [e["index"] for e in evs] == list(range(len(evs))), rid
            assert [e["token_id"] for e in evs] == REFERENCE[p][:len(evs)], rid
            assert sum(e["type"] in ("done", "error") for e in self.net.events.get(rid, [])) <= 1

    @invariant()
    def no_stage_unheld_while_capacity(self):
        if not hasattr(self, "net"):
            return
        core = self.net.core
        # (a join is planned after replan_delay_ms: a pending re-plan is the transient allowed)
        if core._replan_at is None and any(w.state in ("idle", "loading", "ready", "suspect") for w in core.workers.values() if w.alive):
            assert all(s.holders for s in core.stages), [s.to_dict() for s in core.stages]

    def teardown(self):
        if not hasattr(self, "net"):
            return
        # a frozen tab thaws: what it was sent arrives late (its stale answers are fenced)
        for conn in list(self.net.frozen):
            self.net.frozen.discard(conn)
            for m in self.net.held.pop(conn, []):
                self.net.queue.append(("down", conn, m))
        self.net.add_worker()
        self.net.run()
        for _ in range(1200):
            if all(self.net.done(r) for r in self.sessions):
                break
            self.net.advance(0.05)
        for rid, p in self.sessions.items():
            assert self.net.done(rid), rid
            assert self.net.tokens(rid) == REFERENCE[p], rid


CoordinatorMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=20, deadline=None,
                                                suppress_health_check=[HealthCheck.too_slow])
TestCoordinatorProtocol = CoordinatorMachine.TestCase

"""A simulated network between the coordinator and its tabs: every message to a remote worker
leaves `hop_ms` later, in order, so each pipeline stage's step costs `hop_ms` more, as a LAN
or Wi-Fi hop to a browser tab would (the profiles carry no network properties; this is the
per-hop delay benchmarks/bench_speculation.py varies). The coordinator's own worker is not
delayed: it is in-process. A wrapper over CoordinatorService's public `perform`; nothing in
the coordinator knows about it.
"""
from __future__ import annotations

from coordinator.server import CoordinatorService
from coordinator.records import LOCAL, Close, Send


class LatencyService(CoordinatorService):
    hop_ms: float = 0.0

    def perform(self, actions: list) -> None:
        if not self.hop_ms or self.loop is None:
            return super().perform(actions)
        remote = [a for a in actions if isinstance(a, (Send, Close)) and a.conn != LOCAL]
        if not remote:
            return super().perform(actions)
        super().perform([a for a in actions if not (isinstance(a, (Send, Close)) and a.conn != LOCAL)])
        # one delay for every message: call_later keeps their order on each socket
        self.loop.call_later(self.hop_ms / 1000, super().perform, remote)

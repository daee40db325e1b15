"""A simulated network on the coordinator's side, for workers that are not simulated tabs
(`tabshard worker` processes, as benchmarks/bench_speculation.py runs): every message to a
remote worker crosses a `Link` of a network profile (actors/network.py: latency + jitter +
size / bandwidth, in order per socket), so each pipeline stage's step costs a hop more, as a
LAN or Wi-Fi hop to a browser tab would. Simulated tabs carry their network themselves
(actors/tab.py, both directions); this one delays the coordinator-to-worker direction only,
which is what a per-hop delay needs. The coordinator's own worker is not delayed: it is
in-process. A wrapper over CoordinatorService's public `perform`; nothing in the coordinator
knows about it.
"""
from __future__ import annotations

import collections

from actors.network import Link
from actors.profiles import LOOPBACK, NetworkProfile, get_network
from coordinator.server import CoordinatorService
from coordinator.records import LOCAL, Close, Send
from protocol import wire


class LatencyService(CoordinatorService):
    network: NetworkProfile = LOOPBACK

    @property
    def hop_ms(self) -> float:
        """The one-way delay of a message to a remote worker (a network with only latency)."""
        return self.network.latency_ms

    @hop_ms.setter
    def hop_ms(self, ms: float) -> None:
        self.set_network({"name": f"hop-{ms:g}ms", "latency_ms": float(ms)})

    def set_network(self, spec) -> None:
        """A network name (actors/profiles.NETWORKS) or a table of latency_ms, jitter_ms, bandwidth_mbps."""
        self.network = get_network(spec)
        self.__dict__.pop("_links", None)  # new links; messages already on the way keep their times

    def _link(self, conn) -> tuple[Link, collections.deque]:
        links = self.__dict__.setdefault("_links", {})
        queues = self.__dict__.setdefault("_queues", {})
        if conn not in links:
            links[conn] = Link(self.network)
        return links[conn], queues.setdefault(conn, collections.deque())

    def _release(self, conn) -> None:
        """Every message to `conn` whose time has come, in the order it was sent."""
        queue = self._queues.get(conn)
        if not queue:
            self._queues.pop(conn, None)
            return
        now = self.loop.time()
        due = []
        while queue and queue[0][0] <= now + 1e-9:
            due.append(queue.popleft()[1])
        if not queue:
            del self._queues[conn]
        if due:
            super().perform(due)

    def perform(self, actions: list) -> None:
        if self.loop is None or not (self.network.delays or self.__dict__.get("_queues")):
            return super().perform(actions)
        now = self.loop.time()
        local = []
        for a in actions:
            if not isinstance(a, (Send, Close)) or a.conn == LOCAL:
                local.append(a)
                continue
            size = len(wire.encode(a.msg, validate=False)) if isinstance(a, Send) and self.network.bandwidth_mbps else 0
            # a timer per message at its arrival time releases what is due on its socket, in order
            # (timers due at the same time may run in any order; the queue keeps the socket's)
            link, queue = self._link(a.conn)
            at = link.arrival(now, size)
            queue.append((at, a))
            self.loop.call_at(at, self._release, a.conn)
        if local:
            super().perform(local)

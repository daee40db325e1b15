"""Simulated networks: a tab's link delays every frame by latency + jitter + size / bandwidth, in
order per direction (actors/network.py). The schedule alone, the adapter over a real socket, the
coordinator-side wrapper (simulation/network.py), profiles checked at the edge, and simulated
tabs on real Ray: a 20 ms one-way tab shows it in /status's rtt_ms, a bandwidth-limited tab's
weights arrive no faster than its link allows, and tokens stay exact through both."""
import asyncio
import random
import time

import pytest
import websockets

from actors.network import Link, NetworkedSocket
from actors.profiles import NETWORKS, NetworkProfile, get_network
from protocol.errors import ConfigError


def test_link_keeps_order_and_adds_latency_jitter_and_serialisation():
    net = NetworkProfile("t", latency_ms=20, jitter_ms=15, bandwidth_mbps=8)  # 1 byte per microsecond
    link = Link(net, random.Random(1))
    arrivals = [link.arrival(10.0, 1000) for _ in range(50)]  # 50 frames of 1 ms on the wire, sent at once
    assert arrivals == sorted(arrivals)
    for i, at in enumerate(arrivals):
        on_wire_done = 10.0 + (i + 1) * 0.001
        assert at >= on_wire_done + 0.020 - 1e-9
    # jitter draws differ, yet never more than latency + jitter past the frame's own serialisation
    # (or the frame before it, whose order it keeps)
    assert arrivals[0] <= 10.0 + 0.001 + 0.035 + 1e-9
    assert len({round(b - a, 6) for a, b in zip(arrivals, arrivals[1:])}) > 5
    # a later frame on an idle link pays only its own serialisation and latency
    assert link.arrival(20.0, 0) - 20.0 <= 0.035 + 1e-9
    # unlimited bandwidth, no jitter: latency only
    assert Link(NetworkProfile("l", latency_ms=5)).arrival(1.0, 10**9) == pytest.approx(1.005)


def test_networks_are_checked_once_with_the_field_named():
    assert get_network("phone-wifi") is NETWORKS["phone-wifi"]
    assert 2 * NETWORKS["phone-wifi"].latency_ms >= 10  # the home scenario's phones: >= 10 ms RTT
    custom = get_network({"latency_ms": 20, "bandwidth_mbps": 50})
    assert (custom.latency_ms, custom.jitter_ms, custom.bandwidth_mbps) == (20.0, 0.0, 50.0)
    for bad, field in [({"latency_ms": -1}, "latency_ms"), ({"jitter_ms": float("nan")}, "jitter_ms"),
                       ({"bandwidth_mbps": 0}, "bandwidth_mbps"), ({"latency_ms": "5"}, "latency_ms"),
                       ({"latency_ms": True}, "latency_ms"), ({"lag": 3}, "lag"), ("dial-up", "known networks"),
                       (42, "a name or a table")]:
        with pytest.raises(ConfigError, match=field):
            get_network(bad)
    from simulation.scenario import validate

    with pytest.raises(ConfigError, match="unknown network"):
        validate({"tabs": [{"profile": "cpu-wasm", "network": "carrier-pigeon"}]})
    assert validate({"tabs": [{"profile": "cpu-wasm", "network": {"latency_ms": 3}}]})


async def _echo_server():
    async def echo(ws):
        async for data in ws:
            await ws.send(data)

    return await websockets.serve(echo, "127.0.0.1", 0, compression=None)


def test_networked_socket_delays_both_ways_in_order_over_a_real_socket():
    async def main():
        server = await _echo_server()
        port = server.sockets[0].getsockname()[1]
        try:
            async with websockets.connect(f"ws://127.0.0.1:{port}", compression=None) as raw:
                ws = NetworkedSocket(raw, NetworkProfile("t", latency_ms=20, jitter_ms=10), seed=3)
                t0 = time.monotonic()
                for i in range(30):
                    await ws.send(i.to_bytes(2, "big"))
                got, first = [], None
                async for data in ws:
                    first = first or time.monotonic() - t0
                    got.append(int.from_bytes(data, "big"))
                    if len(got) == 30:
                        break
                assert got == list(range(30))  # jitter never reorders a direction
                assert first >= 0.040  # up 20 ms and down 20 ms at least
                await ws.close()
                assert raw.close_code == 1000 and ws.close_code == 1000
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_networked_socket_sends_what_was_queued_before_its_close():
    received = []

    async def main():
        async def keep(ws):
            async for data in ws:
                received.append(data)

        server = await websockets.serve(keep, "127.0.0.1", 0, compression=None)
        port = server.sockets[0].getsockname()[1]
        try:
            async with websockets.connect(f"ws://127.0.0.1:{port}", compression=None) as raw:
                ws = NetworkedSocket(raw, NetworkProfile("t", latency_ms=30), seed=1)
                await ws.send(b"bye")
                await ws.close(1000, "leaving")  # returns once the close went out, after the bye
            await asyncio.sleep(0.05)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    assert received == [b"bye"]


def test_coordinator_side_links_keep_each_sockets_order():
    """simulation/network.py: messages to each worker leave at their link's arrival times, in the
    order they were sent, whatever order due timers run in; the in-process worker is not delayed."""
    from coordinator.records import LOCAL, Send
    from coordinator.server import CoordinatorService
    from simulation.network import LatencyService

    performed = []

    class Recorder(CoordinatorService):
        def perform(self, actions):
            performed.extend((time.monotonic(), a) for a in actions)

    class Service(LatencyService, Recorder):
        def __init__(self):  # only what perform needs
            self.loop = None

    async def main():
        svc = Service()
        svc.loop = asyncio.get_running_loop()
        svc.set_network({"latency_ms": 15, "jitter_ms": 10})
        t0 = time.monotonic()
        for i in range(20):
            svc.perform([Send("w1", {"i": i}), Send("w2", {"i": i}), Send(LOCAL, {"i": i})])
        await asyncio.sleep(0.2)
        return t0

    t0 = asyncio.run(main())
    for conn in ("w1", "w2"):
        mine = [(t, a.msg["i"]) for t, a in performed if a.conn == conn]
        assert [i for _, i in mine] == list(range(20))
        assert all(t - t0 >= 0.015 for t, _ in mine)
    assert all(t - t0 < 0.015 for t, a in performed if a.conn == LOCAL)
    svc = Service()
    svc.hop_ms = 3
    assert svc.hop_ms == 3 and svc.network.latency_ms == 3


# ---------------------------------------------------------------------- simulated tabs on real Ray
FAR = {"name": "far", "latency_ms": 20.0, "jitter_ms": 2.0, "bandwidth_mbps": 100.0}


@pytest.fixture(scope="module")
def far_and_near(ray_rt, tmp_path_factory):
    """Two simulated tabs, neither able to hold the model alone (so both serve a stage): one 20 ms
    away behind a 100 Mbit/s link, one on loopback."""
    from actors.tab import SimulatedTab
    from simulation.runtime import CoordinatorProcess, plan_served

    log = tmp_path_factory.mktemp("net") / "coordinator.log"
    coord = CoordinatorProcess(["--no-coordinator-compute", "--stages", "2"], log_path=str(log)).start()
    tabs = {"far": SimulatedTab("far", coord.worker_url, coord.token, profile="cpu-wasm", network=FAR,
                                memory_bytes=80 << 20, seed=1),
            "near": SimulatedTab("near", coord.worker_url, coord.token, profile="cpu-wasm", network="loopback",
                                 memory_bytes=80 << 20, seed=2)}
    try:
        for t in tabs.values():
            t.wait_connected()
        coord.wait_for(lambda st: plan_served(st) and len(st["stages"]) == 2, 180, "a plan of two stages served by the tabs")
        yield coord, tabs
    finally:
        for t in tabs.values():
            t.kill()
        coord.stop()


def test_far_tab_shows_its_round_trip_and_tokens_are_exact(far_and_near):
    from simulation.workload import Reference, make_prompt, stream_request

    coord, tabs = far_and_near
    prompt = make_prompt(3, 10)
    ref = Reference.shared().tokens(prompt, 12)
    res = asyncio.run(stream_request(coord.base, "net-1", prompt, 12))
    assert res.error is None and res.ids == ref
    # the coordinator pings every worker each second; its smoothed round trip needs a few pongs
    def rtts(st):
        return {w["name"]: w["rtt_ms"] for w in st["workers"] if w["name"] in tabs and w["state"] != "dead" and w.get("rtt_ms")}

    rtt = rtts(coord.wait_for(lambda st: len(rtts(st)) == 2, 30, "round trips of both tabs"))
    assert rtt["far"] >= 2 * FAR["latency_ms"], rtt
    assert rtt["near"] < rtt["far"], rtt
    st = coord.status()
    stage_holders = {h for s in st["stages"] for h in s["holders"][:1]}
    names = {w["worker_id"]: w["name"] for w in st["workers"]}
    assert {names[h] for h in stage_holders} == {"far", "near"}  # the far tab was in the path of every token


def test_bandwidth_limited_tab_loads_no_faster_than_its_link(far_and_near):
    _, tabs = far_and_near
    far, near = tabs["far"].info(), tabs["near"].info()
    assert far["network"] == "far" and near["network"] == "loopback"
    assert far["loads"] and near["loads"], (far["loads"], near["loads"])
    for load in far["loads"]:
        # a physical lower bound: the bytes cannot cross 100 Mbit/s faster than this
        assert load["seconds"] >= load["bytes"] * 8 / (FAR["bandwidth_mbps"] * 1e6), load
    rate = lambda loads: sum(x["bytes"] for x in loads) / sum(x["seconds"] for x in loads)  # noqa: E731
    print("far", far["loads"], "near", near["loads"])
    assert rate(far["loads"]) < rate(near["loads"]), (far["loads"], near["loads"])

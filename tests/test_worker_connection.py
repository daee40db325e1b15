"""The Python worker's asyncio adapter (tab_worker/client.py) on a real loopback WebSocket.

A decode step known to be quick runs on the event loop (no hand-off to the compute thread and
back) and answers bit for bit what the compute thread would; the first step of a range, a
prefill and a slowed tab's step go to the compute thread; heartbeats keep flowing."""
import asyncio
import contextlib
import fcntl
import os
import threading
import time

import numpy as np
import websockets

from actors.faults import slow_down
from tab_worker.client import WorkerConnection
from protocol import wire
from tabshard.cluster import free_port
from tests.harness import start_net
from tests.tiny_model import tiny_weights


def loaded_worker():
    """A numpy TabWorker holding the whole tiny model, joined and loaded through the real protocol."""
    net = start_net(tiny_weights(), 1)
    st = net.core.stages[0]
    return net.workers[net.stage_conn(0)], (st.layer_start, st.layer_end), net.core.config.hidden


def steps(layers, hidden):
    rng = np.random.default_rng(3)
    shapes = [(0, 4), (4, 1), (5, 1), (6, 1), (7, 1)]  # a prefill, then decode steps
    return [wire.make("step", step_id=i + 1, epoch=1, layer_start=layers[0], layer_end=layers[1],
                      sessions=[{"session_id": "s", "start_pos": pos, "length": n}],
                      hidden=rng.standard_normal((n, hidden)).astype(np.float32), want_topk=0)
            for i, (pos, n) in enumerate(shapes)]


def test_quick_decode_steps_run_on_the_loop_and_answer_exactly():
    worker, layers, hidden = loaded_worker()
    twin, _, _ = loaded_worker()  # computes the same steps directly, for the expected answers
    worker.heartbeat_ms = 40
    ran_on = []
    on_step = worker.on_step

    def recording(m):
        ran_on.append(threading.current_thread().name)
        if m["step_id"] == 4:  # from the next step on, this tab is slowed (the simulation's fault)
            slow_down(worker, 1.5)
        return on_step(m)

    worker.on_step = recording
    port = free_port()
    msgs = steps(layers, hidden)
    answers, heartbeats = [], []

    async def coordinator(ws):
        assert wire.decode(await ws.recv())["type"] == "hello"
        for m in msgs:
            await ws.send(wire.encode(m))
            while True:
                r = wire.decode(await ws.recv())
                if r["type"] == "heartbeat":
                    heartbeats.append(r)
                    continue
                answers.append(r)
                break
        await asyncio.sleep(0.15)  # idle: heartbeats only
        while True:
            try:
                heartbeats.append(wire.decode(await asyncio.wait_for(ws.recv(), 0.01)))
            except asyncio.TimeoutError:
                break
        await ws.close()

    async def main():
        async with websockets.serve(coordinator, "127.0.0.1", port, compression=None, max_size=None):
            await asyncio.wait_for(WorkerConnection(worker, f"ws://127.0.0.1:{port}", reconnect=False).run(), 30)

    asyncio.run(main())
    loop_thread = threading.current_thread().name
    # prefill and first decode step of the range: compute thread (nothing measured yet); then on
    # the loop; the slowed tab's step goes back to the compute thread
    assert [name == loop_thread for name in ran_on] == [False, False, True, True, False]
    assert all(name.startswith("tab-compute") for name in ran_on if name != loop_thread)
    assert [a["type"] for a in answers] == ["step_result"] * len(msgs)
    for m, a in zip(msgs, answers):
        expected = twin.handle(m)[0]
        assert a["step_id"] == m["step_id"]
        np.testing.assert_array_equal(a["output"], expected["output"])
    assert heartbeats and all(h["type"] == "heartbeat" for h in heartbeats)


def test_is_quick_step_needs_a_measured_decode_step_under_budget():
    worker, layers, hidden = loaded_worker()
    prefill, decode, *_ = steps(layers, hidden)
    assert not worker.is_quick_step(decode, 1e9)  # never measured on this range
    worker.handle(prefill)
    assert not worker.is_quick_step(decode, 1e9)  # a prefill does not count
    worker.handle(decode)
    assert worker.is_quick_step(decode, 1e9)
    assert not worker.is_quick_step(decode, 0.0)  # over budget
    assert not worker.is_quick_step(prefill, 1e9)  # prefill rows
    other = dict(decode, layer_start=layers[0], layer_end=layers[1] + 1)
    assert not worker.is_quick_step(other, 1e9)  # another range
    slow_down(worker, 2.0)
    assert not worker.is_quick_step(decode, 1e9)


def test_refused_sockets_reconnect_ever_more_slowly_and_honour_a_backoffs_retry_after():
    """A socket that opens and is refused before any welcome (an address backed off, or over its
    joins a second) reconnects after waits that double, not every 0.1 s: ten tabs of one host
    retrying so would use up the address's joins for its other tabs and clients. A backoff
    refusal's retry_after_s is waited out."""
    worker, _, _ = loaded_worker()
    port = free_port()
    opened = []

    async def coordinator(ws):
        opened.append(asyncio.get_running_loop().time())
        assert wire.decode(await ws.recv())["type"] == "hello"
        if len(opened) == 1:
            await ws.send(wire.encode(wire.make("error", code="backoff", field=None, message="backed off",
                                                retry_after_s=0.8)))
            await ws.close(1008, "backed off")
        else:
            await ws.close(1013, "more than 20 new sockets a second from this address")

    async def main():
        conn = WorkerConnection(worker, f"ws://127.0.0.1:{port}")
        async with websockets.serve(coordinator, "127.0.0.1", port, compression=None, max_size=None):
            task = asyncio.create_task(conn.run())
            await asyncio.sleep(2.5)
            conn.stop()
            await asyncio.wait_for(task, 10)

    asyncio.run(main())
    gaps = np.diff(opened)
    # 0.8 s asked after the backoff; then 0.2, 0.4, 0.8 s (+ up to 20 % jitter): at most 5 sockets
    # in 2.5 s, where waits started over at each open made about twenty
    assert gaps[0] >= 0.8 and len(opened) <= 5, gaps
    assert all(b > a for a, b in zip(gaps[1:], gaps[2:])), gaps


def test_a_tab_reconnects_with_the_pass_it_was_welcomed_with():
    """The pass a welcome carries (coordinator/security.Standing) goes with every later socket as
    its `?standing=` query: a proven tab so rejoins while its address is backed off."""
    worker, _, _ = loaded_worker()
    port = free_port()
    paths = []

    async def coordinator(ws):
        paths.append(ws.request.path)
        assert wire.decode(await ws.recv())["type"] == "hello"
        await ws.send(wire.encode(wire.make("welcome", worker_id=f"w{len(paths)}", heartbeat_ms=1000, epoch=len(paths),
                                            standing="p/ss+1" if len(paths) == 1 else None)))
        await ws.close(1001, "going away")

    async def main():
        conn = WorkerConnection(worker, f"ws://127.0.0.1:{port}/ws/worker")
        async with websockets.serve(coordinator, "127.0.0.1", port, compression=None, max_size=None):
            task = asyncio.create_task(conn.run())
            while len(paths) < 3:
                await asyncio.sleep(0.05)
            conn.stop()
            await asyncio.wait_for(task, 10)

    asyncio.run(main())
    # the first socket has none; later ones keep the pass (a welcome without one leaves it)
    assert paths[0] == "/ws/worker" and paths[1] == paths[2] == "/ws/worker?standing=p%2Fss%2B1", paths


def test_a_device_of_its_own_takes_its_cpu_time_times_the_factor_whatever_the_wall_time():
    """slow_down(cpu_time=True), as bench_plans' replicas run: a step takes factor x its CPU time;
    wall time the host's other processes added (here 50 ms more, with 10 ms of CPU) comes off
    the sleep instead of adding to the step, as it did (50 + 9 x 10 = 140 ms)."""
    import itertools
    import time

    worker, layers, hidden = loaded_worker()
    slow_down(worker, 10.0, cpu_time=True)
    worker.compute_clock = itertools.cycle([0.0, 0.010]).__next__  # 10 ms of CPU a step
    worker.result_filters.append(lambda m, reply: time.sleep(0.05))
    reply = worker.on_step(steps(layers, hidden)[0])[0]
    assert 98 <= reply["compute_ms"] <= 125, reply["compute_ms"]


def test_a_device_of_its_own_is_charged_the_least_recent_compute_of_a_steps_shape():
    """A step whose CPU time the host inflated (another process's load, through the memory
    system) is charged, on a device of its own, the least CPU time of the recent steps of its
    shape; a step of another shape (a prompt's rows) is charged its own."""
    worker, layers, hidden = loaded_worker()
    slow_down(worker, 10.0, cpu_time=True)
    cpu = iter([0.0, 0.030, 0.0, 0.004, 0.0, 0.005, 0.0, 0.012, 0.0, 0.004])  # (c0, c1) a step
    worker.compute_clock = lambda: next(cpu)
    prefill, *decode = steps(layers, hidden)
    assert 295 <= worker.on_step(prefill)[0]["compute_ms"] <= 330  # a prompt's step: its own 30 ms
    charged = [worker.on_step(m)[0]["compute_ms"] for m in decode]
    # 4 ms, 5 -> 4, 12 -> 4 (the inflated step), 4
    assert all(38 <= ms <= 60 for ms in charged), charged


def test_slowed_workers_of_one_host_take_turns_to_compute_and_sleep_outside_their_turn(tmp_path):
    """host_turns: simulated devices given the same lock file compute one at a time (computing
    at once they shared the host's memory bandwidth, which separate devices do not); a worker
    holds its turn while it computes a step, not while it sleeps its slowing."""
    from actors.faults import host_turns

    path = str(tmp_path / "turns")
    first, second = host_turns(path), host_turns(path)
    order = []

    def hold(turn, name, seconds):
        with turn():
            order.append(f"{name} in")
            time.sleep(seconds)
            order.append(f"{name} out")

    a = threading.Thread(target=hold, args=(first, "a", 0.3))
    a.start()
    time.sleep(0.05)
    hold(second, "b", 0.0)
    a.join()
    assert order == ["a in", "a out", "b in", "b out"]

    worker, layers, hidden = loaded_worker()
    slow_down(worker, 20.0, cpu_time=True)
    worker.compute_turn = host_turns(path)
    held = []
    turn = worker.compute_turn

    @contextlib.contextmanager
    def watched():
        with turn():
            held.append(time.perf_counter())
            yield
            held.append(time.perf_counter())

    worker.compute_turn = watched
    t0 = time.perf_counter()
    (reply,) = worker.on_step(steps(layers, hidden)[0])
    wall = time.perf_counter() - t0
    assert reply["type"] == "step_result" and len(held) == 2
    # the turn was held for the compute alone: the step's wall time is 20x that, the rest asleep
    assert wall > 5 * (held[1] - held[0]), (wall, held[1] - held[0])
    fd = os.open(path, os.O_RDWR)  # and given back: another device of the host may take its turn at once
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)

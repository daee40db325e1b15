"""The Python tab worker reports load_progress as the browser tab does, at a bounded rate: on an
accepted assignment, on each completed blob, and between those at most every PROGRESS_S of its
clock, never per chunk. State machine level: a fake clock, no sockets (tests/harness.py for the
coordinator side). Chunks are shrunk to 512 bytes so the tiny model's blobs take dozens each."""
import itertools

import pytest

import coordinator.machine.weights
import protocol.blobs
from coordinator.dashboard import DashboardFeed
from coordinator.records import CoordinatorSettings
from protocol.blobs import blob_info, chunk, pack_head, pack_layer, sha256
from tab_worker.worker import PROGRESS_S, TabWorker
from protocol import wire
from tests.harness import Net
from tests.tiny_model import TINY

CHUNK = 512


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(protocol.blobs, "CHUNK_BYTES", CHUNK)
    monkeypatch.setattr(coordinator.machine.weights, "CHUNK_BYTES", CHUNK)  # the coordinator's chunk offsets


def assignment(blobs: dict[str, bytes]) -> tuple[dict, list[dict]]:
    """An assign of layers 0-1 plus the head, and the weights_chunk messages the coordinator streams."""
    infos = [blob_info(k, v) for k, v in blobs.items()]
    assign = wire.make("assign", assignment_id=1, layer_start=0, layer_end=2, include_head=True, model=TINY.to_dict(),
                       max_ctx=64, precision={}, chunks=[i.to_dict() for i in infos])
    chunks = [wire.make("weights_chunk", chunk_id=c, name=i.key, blob=i.sha256, offset=c * CHUNK, total=i.size,
                        data=bytes(chunk(blobs[i.key], c)), sha256=sha256(chunk(blobs[i.key], c)))
              for i in infos for c in range(i.chunks)]
    return assign, chunks


def load(weights, seconds_per_chunk: float):
    blobs = {"layer:0": pack_layer(0, weights.layers[0]), "layer:1": pack_layer(1, weights.layers[1]),
             "head": pack_head(weights.head)}
    assign, chunks = assignment(blobs)
    tab = TabWorker("t", backend="numpy")
    now = [100.0]
    tab.clock = lambda: now[0]
    first = tab.handle(assign)
    out = []
    for m in chunks:
        now[0] += seconds_per_chunk
        out += tab.handle(wire.decode(wire.encode(m)))
    return blobs, first, chunks, out, now[0] - 100.0


def test_assignment_reports_what_it_needs(small_chunks, weights):
    blobs, first, *_ = load(weights, 0.0)
    total = sum(map(len, blobs.values()))
    assert first == [wire.make("load_progress", layer=0, received_bytes=0, total_bytes=total)]


def test_progress_per_blob_when_chunks_come_fast(small_chunks, weights):
    blobs, _, chunks, out, _ = load(weights, 0.0)
    progress = [m for m in out if m["type"] == "load_progress"]
    assert len(chunks) > 60 and len(progress) == len(blobs)  # one per completed blob, none per chunk
    sizes = list(map(len, blobs.values()))
    assert [p["received_bytes"] for p in progress] == [sum(sizes[:i + 1]) for i in range(len(sizes))]
    assert [p["layer"] for p in progress] == [0, 1, 1]  # the head keeps the last layer, as in worker.js
    assert [m["type"] for m in out[-2:]] == ["load_progress", "ready"]  # 100% first, then ready
    for p in progress:
        assert wire.decode(wire.encode(p)) == p  # the MESSAGES schema accepts it


def test_progress_between_blobs_at_most_every_interval(small_chunks, weights):
    step = 0.01
    blobs, _, chunks, out, elapsed = load(weights, step)
    progress = [m for m in out if m["type"] == "load_progress"]
    received = [p["received_bytes"] for p in progress]
    assert received == sorted(received) and received[-1] == progress[-1]["total_bytes"] == sum(map(len, blobs.values()))
    boundaries = set(itertools.accumulate(map(len, blobs.values())))
    timed = [r for r in received if r not in boundaries]
    assert len(timed) >= int(elapsed / PROGRESS_S) - len(blobs)  # mid-blob reports keep coming...
    assert len(progress) <= len(blobs) + elapsed / PROGRESS_S + 1  # ...but no faster than the interval
    assert len(progress) < len(chunks) / 10


def test_coordinator_and_dashboard_take_the_reports(small_chunks, weights):
    net = Net(weights, CoordinatorSettings(max_ctx=256))
    conn = net.add_worker()
    ticks = itertools.count()
    net.workers[conn].clock = lambda: next(ticks) * 0.05
    sent, up = [], net.to_coordinator
    net.to_coordinator = lambda c, m: (sent.append(m) if m["type"] == "load_progress" else None, up(c, m))
    feed = DashboardFeed()

    def record():
        w = net.core.workers.get(net.core.conn_worker.get(conn, ""))
        return w

    # mid-load: the coordinator holds the last report and the dashboard shows it as a fraction
    def mid_load():
        w = record()
        return w is not None and w.state == "loading" and w.load_progress.get("received_bytes", 0) > 0

    for _ in range(40):
        net.advance(0.05, until=mid_load)
        if mid_load():
            break
    assert mid_load()
    w = record()
    got = w.load_progress
    snap = feed.snapshot(net.core.status(net.now), net.core, net.now, 0.0)
    row = next(x for x in snap["workers"] if x["id"] == w.worker_id)
    assert row["progress"] == round(got["received_bytes"] / got["total_bytes"], 3)
    net.run()
    net.advance(0.5)
    assert net.core.stages and all(s.primary in s.ready for s in net.core.stages)
    chunks = sum(i.chunks for i in net.core.blob_info.values())
    assert 0 < len(sent) < chunks / 4
    last = sent[-1]
    assert last["received_bytes"] == last["total_bytes"]
    # ready: the last (100 %) report stays; a new assignment starts afresh
    assert w.state == "ready" and w.load_progress == {k: last[k] for k in ("layer", "received_bytes", "total_bytes")}
    net.perform(net.core._assign(w, net.core.stages[0], net.now))
    assert w.load_progress == {}
    assert net.core.counters["protocol_errors"] == 0 and not net.closed

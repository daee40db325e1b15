"""copy_kv over real sockets: `tabshard serve` on 127.0.0.1 with a synthetic model and two
Python workers (processes, numpy, their steps slowed asleep as on slower devices). Streams run
on the first worker's one-stage pipeline; a worker four times as fast joins, and the re-plan
splits the stage in two: the joiner's first layers, the first worker's last layers and the head. The
first worker holds each moving session's KV of those layers already (in the range it serves
on the old pipeline): it gets copy_kv, only the joiner replays the history, the moves complete
while the streams run, and every stream's tokens are a single process's."""
import asyncio
import os
import subprocess
import sys
import threading

from simulation.runtime import CoordinatorProcess
from simulation.workload import Reference, stream_request

MODEL = "synthetic:llama-mini@3"
PROMPTS = ["a copy of the keys", "and of the values too", "moved between two ranges"]
N_TOKENS = 160
WORKER = """
import asyncio, sys
from actors.faults import slow_down
from tab_worker.client import WorkerConnection
from tab_worker.worker import TabWorker
url, token, name, slow = sys.argv[1:5]
w = TabWorker(name, backend="numpy", token=token)
slow_down(w, float(slow), cpu_time=True)
asyncio.run(WorkerConnection(w, url).run())
"""


def start_worker(coord: CoordinatorProcess, name: str, slow: float, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, coord.worker_url, coord.token, name, str(slow)],
                            env=dict(os.environ, TABSHARD_CPU_THREADS="1", OPENBLAS_NUM_THREADS="1"),
                            stdout=log, stderr=subprocess.STDOUT)


def test_a_move_onto_the_old_workers_sub_range_copies_its_kv_over_real_sockets(tmp_path):
    conf = tmp_path / "serve.toml"
    conf.write_text("stages = 2\nprobation_steps = 0\nspot_check_fraction = 0.0\n")
    coord = CoordinatorProcess(["--config", str(conf), "--no-coordinator-compute"], model=MODEL,
                               log_path=str(tmp_path / "coordinator.log")).start()
    procs = []
    try:
        with open(tmp_path / "workers.log", "wb") as log:
            procs.append(start_worker(coord, "old", 40.0, log))
            coord.wait_for(lambda st: st["stages"] and all(s["holders"] and s["holders"][0] in s["ready"] for s in st["stages"]),
                           120, "the first worker's plan served")
            results = {}

            async def streams():
                got = await asyncio.gather(*[stream_request(coord.base, f"r{i}", p, N_TOKENS, timeout=240)
                                             for i, p in enumerate(PROMPTS)])
                results.update({r.request_id: r for r in got})

            clients = threading.Thread(target=asyncio.run, args=(streams(),))
            clients.start()
            coord.wait_for(lambda st: len(st["sessions"]) == len(PROMPTS) and all(s["tokens"] >= 4 for s in st["sessions"]),
                           120, "every stream decoding")
            # four times as fast: at twice, a busy host's join measurement (wall time, others' work
            # counted) could make the re-plan not pay until the streams were nearly done
            procs.append(start_worker(coord, "late", 10.0, log))
            clients.join(300)
        st = coord.status()
        reference = Reference.shared(MODEL)
        for i, p in enumerate(PROMPTS):
            r = results[f"r{i}"]
            assert r.error is None and r.ids == reference.tokens(p, N_TOKENS), (i, r.error)
        workers = {w["worker_id"]: w["name"] for w in st["workers"]}
        stages = [(workers[s["holders"][0]], s["layers"], s["head"]) for s in st["stages"]]
        assert [(name, layers[0] > 0, head) for name, layers, head in stages] == [("late", False, False), ("old", True, True)], stages
        assert st["counters"]["kv_copies"] >= 1 and st["counters"]["kv_copies_failed"] == 0, st["counters"]
        # the old pipeline retired while the streams ran: their moves completed
        retired = [e["t"] for e in st["events"] if e["kind"] == "retired"]
        assert retired, [e["kind"] for e in st["events"]]
        after = [sum(t > retired[0] for t in r.times) for r in results.values()]
        # (seen failing now and then with the retirement at the streams' end: the events say
        # whether the re-plan came late, or the moves did)
        assert min(after) >= 10, (after, [(e["kind"], round(e["t"] - retired[0], 2), e.get("worker"), str(e.get("reason", ""))[:50])
                                          for e in st["events"] if e["kind"] not in ("trusted", "loaded")])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        coord.stop()
        print((tmp_path / "workers.log").read_text(errors="replace")[-3000:])

"""Simulated CPU tabs as plain processes: one Ray actor per node (`_TabHost`, num_cpus=0) starts
each tab as `python -m actors.tab_process`, a process that never imports Ray, and relays the
facade's control calls to it as JSON lines (actors/tab_process.py says the format). A Ray actor
process carries Ray's runtime (its core worker, gRPC, _raylet.so) beside the tab: tens of MB a
tab that a browser tab does not have. Crash is the tab process exiting, freeze SIGSTOP and
SIGCONT of it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])


class _Child:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lock = threading.Lock()
        self.next_id = 1
        self.waiting: dict[int, list] = {}  # id -> [threading.Event, reply]
        self.started = threading.Event()
        self.start_reply: dict | None = None
        self.gone = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                m = json.loads(line)
            except ValueError:
                continue
            if m.get("id") == 0:
                self.start_reply = m
                self.started.set()
                continue
            slot = self.waiting.get(m.get("id"))
            if slot is not None:
                slot[1] = m
                slot[0].set()
        self.gone = True  # EOF: the process ended (or closed its channel)
        self.started.set()
        for slot in list(self.waiting.values()):
            slot[0].set()


class _TabHost:
    """Starts tab processes on its node and relays calls to them. Answers are tagged tuples,
    never exceptions, so the facade turns them into TabGone / TabUnresponsive itself."""

    def __init__(self):
        self.children: dict[str, _Child] = {}

    def spawn(self, name: str, args: list) -> int:
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.Popen([sys.executable, "-m", "actors.tab_process"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, cwd=ROOT, text=True, bufsize=1)
        proc.stdin.write(json.dumps({"args": args}) + "\n")
        proc.stdin.flush()
        self.children[name] = _Child(proc)
        return proc.pid

    def call(self, name: str, method: str, args: list, timeout: float) -> tuple:
        child = self.children.get(name)
        if child is None:
            return ("gone", "no such tab")
        if not child.started.wait(timeout):
            return ("timeout", "the tab did not start in time")
        if child.start_reply is not None and "error" in child.start_reply:
            return ("gone", f"the tab failed to start: {child.start_reply['error']}")
        if child.gone:
            return ("gone", f"exit code {child.proc.poll()}")
        with child.lock:
            rid = child.next_id
            child.next_id += 1
            slot = child.waiting[rid] = [threading.Event(), None]
            try:
                child.proc.stdin.write(json.dumps({"id": rid, "method": method, "args": list(args)}) + "\n")
                child.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                child.waiting.pop(rid, None)
                return ("gone", "its control pipe is closed")
        try:
            if not slot[0].wait(timeout):
                return ("timeout", f"no answer within {timeout:.0f}s")
        finally:
            child.waiting.pop(rid, None)
        if slot[1] is None:
            return ("gone", f"exit code {child.proc.poll()}")
        if "error" in slot[1]:
            return ("error", slot[1]["error"])
        return ("ok", slot[1]["ok"])

    def kill(self, name: str) -> None:
        child = self.children.pop(name, None)
        if child is not None and child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait(10)


_hosts: dict = {}
_hosts_lock = threading.Lock()  # tabs are started from several threads (a scenario's pool): one host a node


def host_for(index: int):
    """The tab host of one of the cluster's alive nodes (round robin by `index`), started on
    first use: a named actor per node, owned by this driver (it ends with this Ray session)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
    node = nodes[index % len(nodes)]
    key = (ray.get_runtime_context().get_job_id(), node)
    with _hosts_lock:
        if key not in _hosts:
            cls = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=256)(_TabHost)
            _hosts[key] = cls.options(name=f"tabshard-tab-host-{node[:12]}", get_if_exists=True,
                                      scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        return _hosts[key]

"""Ray and coordinator plumbing shared by the scenario runner, the tests and the benchmarks.

`ray_session` starts a local Ray (or connects to an existing cluster) and shuts down only what
it started. `CoordinatorProcess` runs `tabshard serve` as a subprocess and polls /status.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from protocol.errors import TabshardError

# before ray.init: Ray's raylet (and so every actor) inherits this environment
ACTOR_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
             "RAY_worker_maximum_startup_concurrency": "64", "RAY_AUTH_MODE": "disabled",
             "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int = 2, num_gpus: float | None = None):
    """A Ray of our own (`address` None) or a connection to an existing cluster. Never `ray stop`:
    only `ray.shutdown()` of what this call started. `num_gpus` declares the local Ray's GPUs
    (None: Ray detects them)."""
    import ray

    for k, v in ACTOR_ENV.items():
        os.environ.setdefault(k, v)
    if not os.environ.get("XDG_RUNTIME_DIR") or not os.path.isdir(os.environ["XDG_RUNTIME_DIR"]):
        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="xdg-")
    if ray.is_initialized():
        yield ray
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 **({"num_gpus": num_gpus} if num_gpus is not None else {}),
                 object_store_memory=200 << 20, _system_config={"automatic_object_spilling_enabled": False})
    try:
        yield ray
    finally:
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch_status(base: str, events_since: float | None = None) -> dict:
    """/status; with `events_since`, every event the coordinator retains after that time instead
    of the last 50 (a burst of events between two polls is then not lost)."""
    query = "" if events_since is None else f"?events_since={events_since!r}"
    with urllib.request.urlopen(f"{base}/status{query}", timeout=5) as r:
        return json.loads(r.read())


def wait_for_status(base: str, coordinator: subprocess.Popen | None, pred, timeout: float, what: str = "condition") -> dict:
    """Poll a coordinator's /status until pred(status) holds; fail early if its process exits."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if coordinator is not None and coordinator.poll() is not None:
            raise TabshardError(f"the coordinator exited with code {coordinator.returncode}")
        try:
            last = fetch_status(base)
            if pred(last):
                return last
        except OSError:
            pass
        time.sleep(0.1)
    raise TabshardError(f"timed out after {timeout:.0f}s waiting for {what}; last status: {json.dumps(last)[:2000]}")


def node_ip() -> str:
    """The address other Ray nodes reach this one at (127.0.0.1 on a single machine)."""
    try:
        import ray

        if ray.is_initialized() and len(ray.nodes()) > 1:
            return ray.util.get_node_ip_address()
    except Exception:
        pass
    return "127.0.0.1"


class CoordinatorProcess:
    """`tabshard serve` in a subprocess; every process is ours by PID."""

    def __init__(self, serve_args: list[str] | None = None, token: str = "sim-token", host: str = "127.0.0.1",
                 log_path: str | None = None, model: str | None = None, port: int | None = None):
        self.host = host
        self.port = port or free_port()
        self.token = token
        self.serve_args = list(serve_args or [])
        self.model = model
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def worker_url(self) -> str:
        return f"ws://{self.host if self.host != '0.0.0.0' else node_ip()}:{self.port}/ws/worker"

    def start(self, timeout: float = 120) -> "CoordinatorProcess":
        cmd = [sys.executable, "-m", "tabshard.cli", "serve", "--host", self.host, "--port", str(self.port),
               "--token", self.token, *self.serve_args]
        if self.model:
            cmd += ["--model", self.model]
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.wait_for(lambda st: True, timeout, "the coordinator to answer")
        return self

    def status(self, events_since: float | None = None) -> dict:
        return fetch_status(self.base, events_since)

    def wait_for(self, pred, timeout: float, what: str = "condition") -> dict:
        return wait_for_status(self.base, self.proc, pred, timeout, what)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def plan_served(st: dict, remote_only: bool = True) -> bool:
    """Every stage has a ready primary (a tab, not the coordinator itself, when remote_only)."""
    return bool(st["stages"]) and all(s["holders"] and s["holders"][0] in s["ready"] and
                                      (not remote_only or s["holders"][0] != "local") for s in st["stages"])


class EventLog:
    """Every coordinator event, deduplicated across /status polls (status shows the last 50)."""

    def __init__(self):
        self.events: list[dict] = []
        self._seen: set = set()

    @property
    def since(self) -> float | None:
        """A time to poll /status?events_since= with so that nothing after the last absorbed
        event is missed (a little before it: events of the same instant are deduplicated)."""
        return max(e["t"] for e in self.events) - 0.01 if self.events else None

    def absorb(self, st: dict) -> None:
        for e in st.get("events", []):
            key = (e["t"], e["kind"], str(e.get("worker")), str(e.get("stage")), str(e.get("request_id")))
            if key not in self._seen:
                self._seen.add(key)
                self.events.append(e)

    def sorted(self) -> list[dict]:
        return sorted(self.events, key=lambda e: e["t"])


def workers_by_name(st: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for w in st["workers"]:
        out.setdefault(w["name"], []).append(w)
    return out


def write_json(path: str | Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, default=str))

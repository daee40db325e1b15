"""Start a coordinator and worker processes on 127.0.0.1 (demo, tests, benchmarks): the
coordinator is simulation.runtime.CoordinatorProcess, the workers `tabshard worker` processes.

Every process is ours by PID: stop() ends exactly those, nothing else.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from simulation.runtime import CoordinatorProcess, free_port


class LocalCluster:
    def __init__(self, workers: int = 4, backend: str = "numpy", port: int | None = None, token: str = "demo-token",
                 serve_args: list[str] | None = None, log_dir: str | None = None, model: str | None = None):
        self.port = port or free_port()
        self.token = token
        self.backend = backend
        self.n_workers = workers
        self.serve_args = serve_args or []
        self.model = model
        self.log_dir = Path(log_dir) if log_dir else None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self.coord = CoordinatorProcess(self.serve_args, token, log_path=str(self.log_dir / "coordinator.log") if self.log_dir else None,
                                        model=model, port=self.port)
        self.workers: list[subprocess.Popen] = []
        self._env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")

    @property
    def coordinator(self) -> subprocess.Popen | None:
        """The coordinator's process (a test may replace it with a restarted one)."""
        return self.coord.proc

    @coordinator.setter
    def coordinator(self, proc: subprocess.Popen) -> None:
        self.coord.proc = proc

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def worker_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/worker"

    def _out(self, name: str):
        if self.log_dir is None:
            return subprocess.DEVNULL
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return open(self.log_dir / f"{name}.log", "wb")

    def start(self, timeout: float = 120) -> "LocalCluster":
        """Start the coordinator and the workers, and wait for a plan served by them. Once only:
        `with LocalCluster(...).start(timeout=...)` enters a started cluster (a second start
        would have doubled the workers on the first coordinator and orphaned it at stop)."""
        if self.coord.proc is not None and self.coord.proc.poll() is None:
            return self
        self.coord.start(timeout)
        for _ in range(self.n_workers):
            self.add_worker()
        self.wait_for(lambda st: st["stages"] and all(s["holders"] and s["holders"][0] in s["ready"] for s in st["stages"])
                      and sum(1 for w in st["workers"] if not w["local"] and w["state"] == "ready") >= self.n_workers
                      and not any(h == "local" for s in st["stages"] for h in s["holders"][:1])
                      # the spot-check verifier has built its ranges: nothing loads behind the first requests
                      and all(r[2] == "ready" for r in st.get("verifier_ranges", [])) if self.n_workers else
                      st["stages"] and all(s["holders"][0] in s["ready"] for s in st["stages"]), timeout, what="plan ready")
        return self

    def add_worker(self, name: str | None = None, extra: list[str] | None = None) -> subprocess.Popen:
        name = name or f"worker-{len(self.workers)}"
        cmd = [sys.executable, "-m", "tabshard.cli", "worker", "--connect", self.worker_url, "--token", self.token,
               "--backend", self.backend, "--name", name, *(extra or [])]
        p = subprocess.Popen(cmd, env=self._env, stdout=self._out(name), stderr=subprocess.STDOUT)
        self.workers.append(p)
        return p

    def status(self) -> dict:
        return self.coord.status()

    def wait_for(self, pred, timeout: float, what: str = "condition") -> dict:
        return self.coord.wait_for(pred, timeout, what)

    def stage_worker_pid(self, stage: int) -> int:
        """The PID of the worker process serving a stage (matched by the worker's name)."""
        st = self.status()
        wid = st["stages"][stage]["holders"][0]
        name = next(w["name"] for w in st["workers"] if w["worker_id"] == wid)
        return self.workers[int(name.rsplit("-", 1)[1])].pid

    def signal_worker(self, pid: int, sig: int) -> None:
        os.kill(pid, sig)

    def stop(self) -> None:
        for p in self.workers + ([self.coordinator] if self.coordinator else []):
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)
                except OSError:
                    pass
                p.terminate()
        for p in self.workers + ([self.coordinator] if self.coordinator else []):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

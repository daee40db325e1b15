"""A simulated browser tab placed by Ray: the Python tab worker on the WebSocket protocol.

`SimulatedTab` is the public facade; `_TabActor` the private tab it drives: a plain process under
its node's tab host for a CPU tab (actors/tab_host.py: no Ray runtime in the tab), a Ray
actor for a WebGPU or GPU tab. Ray places, runs and kills the tab; tensors never travel over
Ray calls -- the tab talks to the coordinator over
the same WebSocket protocol as a browser tab, so every fault is detected by the coordinator's
own mechanisms (socket close, heartbeat silence, step deadlines), never by Ray.

    >>> tab = SimulatedTab("t0", "ws://127.0.0.1:8000/ws/worker", "token", profile="cpu-wasm")  # doctest: +SKIP
    >>> tab.wait_connected(); tab.freeze(2.0); tab.info()["sessions_joined"]                  # doctest: +SKIP

Fault hooks, callable while the tab serves: crash (the process exits), freeze (SIGSTOP for D
seconds, then SIGCONT), slow (compute time x factor), partition (both directions dropped for D
seconds, and no rejoin until it heals), evict (the socket closes with a reason; no reconnect),
memory_pressure (the budget shrinks; the worker hands layers back with `refuse`), lie (every
result gets relative noise of `factor` times its RMS -- actors/faults.py -- until the coordinator's
spot check fences the tab; a fenced liar then leaves like an evicted tab instead of rejoining
under a new worker id and lying again).

The tab's network (the profile's, or `network=`: a name from actors/profiles.NETWORKS or a table
of latency_ms, jitter_ms, bandwidth_mbps) delays every frame it sends and receives
(actors/network.py); info()["loads"] says how long each assigned range took to arrive.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import random
import subprocess
import tempfile
import threading
import time

import numpy as np

from actors.faults import lie, lying, slow_down
from actors.network import NetworkedSocket
from actors.profiles import HIDDEN, NetworkProfile, Profile, get_network, get_profile
from protocol.errors import TabshardError
from protocol.model_types import SessionSlice
from tab_worker.client import WorkerConnection
from tab_worker.worker import TabWorker


class TabGone(TabshardError):
    """The tab's process is gone (crashed, evicted and stopped, or killed)."""


class TabUnresponsive(TabshardError):
    """The tab did not answer a control call in time (frozen, or its host is overloaded)."""


# ---------------------------------------------------------------------- the worker as a browser would run it
def _build_pipelines_at_load(backend) -> None:
    """A load check (TabWorker.load_checks): the browser creates its pipelines at load, so run
    one throwaway position; a kernel beyond the device's limits fails here and the range is
    refused back to the coordinator."""
    backend.forward([SessionSlice("__probe__", 0, 1)], np.zeros((1, backend.config.hidden), np.float32))
    backend.drop_session("__probe__")


class _SimConnection(WorkerConnection):
    """The connection of a simulated tab, through WorkerConnection's hooks: a partitioned tab
    drops every frame both ways and does not rejoin until the partition heals (its hello would
    not get through); a lying tab that the coordinator fences (close code 4000) does not rejoin
    at all; a hidden tab's heartbeats come with a background timer's jitter; every frame crosses
    the tab's network (link); each assigned range's arrival is timed (loads)."""

    FENCED = 4000
    caught_at: float | None = None  # time.monotonic() when a lying tab was fenced

    def __init__(self, *a, heartbeat_jitter_ms: float = 0.0, seed: int = 0, network: NetworkProfile | None = None, **kw):
        super().__init__(*a, **kw)
        self.partitioned = threading.Event()
        self.heartbeat_jitter_ms = heartbeat_jitter_ms
        self._rng = random.Random(seed)
        self.seed = seed
        self.network = network
        self.loads: list[dict] = []  # per assigned range: layers, bytes received, seconds from assign to ready
        self._assigned: dict = {}  # layer_start -> (time.monotonic() at assign, worker.bytes_received then)

    def link(self, ws):
        if self.network is None or not self.network.delays:
            return ws
        return NetworkedSocket(ws, self.network, seed=self.seed + self.sessions_joined)

    def _observe_in(self, m: dict) -> None:
        super()._observe_in(m)
        if m.get("type") == "assign":
            self._assigned[m["layer_start"]] = (time.monotonic(), self.worker.bytes_received)

    def _observe_out(self, m: dict) -> None:
        super()._observe_out(m)
        if m.get("type") == "ready" and m.get("layers") and m["layers"][0] in self._assigned:
            t0, b0 = self._assigned.pop(m["layers"][0])
            self.loads.append({"layers": list(m["layers"]), "bytes": self.worker.bytes_received - b0,
                               "seconds": round(time.monotonic() - t0, 4)})

    def delivers(self) -> bool:
        return not self.partitioned.is_set()

    async def before_hello(self) -> None:
        while self.partitioned.is_set():
            await asyncio.sleep(0.02)

    def session_ended(self, close_code: int | None) -> None:
        if lying(self.worker) and close_code == self.FENCED:
            self.caught_at = time.monotonic()
            self.stop()

    def heartbeat_interval(self) -> float:
        jitter = self._rng.random() * self.heartbeat_jitter_ms if self.heartbeat_jitter_ms else 0.0
        return (self.worker.heartbeat_ms + jitter) / 1000


def _enforce_pipeline_limits(dev) -> None:
    """Validate each pipeline's workgroup size against the device's limits at creation, as a
    browser's WebGPU does (Dawn's createComputePipeline). wgpu-native 29 does not check
    override-sized workgroups (seen here: WG=2048 created on a 256-invocation device), so
    without this a kernel that breaks on the browser would silently run here."""
    if getattr(dev, "_limits_enforced", False):
        return
    import re

    from kernels.runner import LimitError

    original = dev.pipeline

    def pipeline(kernel: str, **constants):
        m = re.search(r"@workgroup_size\(([^)]*)\)", dev.source(kernel))
        dims = [d.strip() for d in m.group(1).split(",")] if m else []
        sizes = [int(constants.get(d, d)) if not d.isdigit() else int(d) for d in dims if d]
        sizes += [1] * (3 - len(sizes))
        total = sizes[0] * sizes[1] * sizes[2]
        lim = dev.limits
        if (total > lim["max-compute-invocations-per-workgroup"] or sizes[0] > lim["max-compute-workgroup-size-x"]
                or sizes[1] > lim["max-compute-workgroup-size-y"] or sizes[2] > lim["max-compute-workgroup-size-z"]):
            raise LimitError(f"createComputePipeline({kernel}): workgroup size {tuple(sizes)} ({total} invocations) exceeds "
                             f"maxComputeInvocationsPerWorkgroup {lim['max-compute-invocations-per-workgroup']} / "
                             f"maxComputeWorkgroupSizeX {lim['max-compute-workgroup-size-x']}")
        return original(kernel, **constants)

    dev.pipeline = pipeline
    dev._limits_enforced = True


def _force_workgroup(dev, size: int) -> None:
    """Configure every kernel on this device at `size` invocations whatever the limits say
    (the test of 'a kernel configured beyond a profile's limit')."""
    dev.workgroup_size = lambda preferred: size


def _choose_adapter(spec: str | int | None) -> str | None:
    """Pick this tab's WebGPU adapter before its device exists: ``spec`` names one (index or part
    of a name), or "ray" / None maps the GPU that Ray gave this actor (num_gpus > 0) to its
    adapter. Returns how the adapter was chosen, for info() and the log; None: wgpu's default."""
    from kernels import adapters

    if spec in (None, "", "ray"):
        import ray

        ids = ray.get_gpu_ids() if ray.is_initialized() else []
        if not ids:
            if spec == "ray":
                raise TabshardError("adapter = 'ray', but Ray gave this tab no GPU (ask for num_gpus > 0)")
            return None
        index, how = adapters.index_for_gpu(int(float(ids[0])), adapters.list_adapters())
        adapters.choose(index)
        print(f"tab adapter: {how}", flush=True)
        return how
    adapters.choose(spec)
    index = adapters.resolve(spec, adapters.list_adapters())
    return f"adapter {spec!r} as configured -> {adapters.list_adapters()[index].describe()}"


def _peak_rss() -> tuple[int, int]:
    rss = hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


# ---------------------------------------------------------------------- the private actor
class _TabActor:
    def __init__(self, name: str, url: str, token: str, profile: dict, backend: str, memory_bytes: int,
                 hidden: bool, device_options: dict, seed: int, network: dict | None = None, address: str | None = None):
        if not os.environ.get("XDG_RUNTIME_DIR") or not os.path.isdir(os.environ["XDG_RUNTIME_DIR"]):
            os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="xdg-")
        self.name = name
        self.profile = profile
        self.address = address
        device_options = dict(device_options or {})
        force_wg = device_options.pop("force_workgroup", None)
        self.adapter_note = _choose_adapter(device_options.pop("adapter", None)) if backend == "wgpu" else None
        if backend == "wgpu":
            from kernels.runner import get_device

            limits = profile.get("limits") or "adapter"
            device_options.setdefault("limits", limits)
            _enforce_pipeline_limits(get_device(device_options["limits"]))
        speed = float(profile.get("speed", 1.0)) * (HIDDEN["speed_factor"] if hidden else 1.0)
        self.base_slow = 1.0 / max(speed, 1e-3)
        self.slow_factor = self.base_slow
        self.slowed_steps: list[int] = []  # per slow() call: the steps (and measurements) that ran slowed
        self.worker = TabWorker(name, backend=backend, token=token, memory_bytes=memory_bytes, device_options=device_options,
                                extra_capabilities={"profile": {
                                    "name": profile.get("name"), "browser": profile.get("browser"),
                                    "features": list(profile.get("features", ())), "hidden": hidden, "speed": speed}})
        slow_down(self.worker, self.slow_factor)
        self.worker.load_checks.append(_build_pipelines_at_load)
        if force_wg and backend == "wgpu":
            # the forced size applies to the kernels built for assigned ranges (the speed measurement ran
            # with the device's own tuning, so the tab joins and is planned first)
            def force() -> None:
                from kernels.runner import get_device

                _force_workgroup(get_device(self.worker.device_options.get("limits", "adapter")), int(force_wg))
            self.worker.before_build.append(force)
        self.started = time.monotonic()
        self.loop = asyncio.new_event_loop()
        self.conn: _SimConnection | None = None
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.conn = _SimConnection(self.worker, url, reconnect=True, seed=seed,
                                       heartbeat_jitter_ms=HIDDEN["heartbeat_jitter_ms"] if hidden else 0.0,
                                       network=get_network(network) if network else None, source_address=address)
            ready.set()
            self.loop.run_until_complete(self.conn.run())

        self.thread = threading.Thread(target=run, name=f"tab-{name}", daemon=True)
        self.thread.start()
        ready.wait()

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict:
        rss, hwm = _peak_rss()
        w = self.worker
        return {"name": self.name, "pid": os.getpid(), "worker_id": w.worker_id, "epoch": w.epoch,
                "connected": self.conn.connected.is_set(), "sessions_joined": self.conn.sessions_joined,
                "ranges": [list(r) for r in w.ranges], "held_bytes": w.held_bytes(), "memory_bytes": w.memory_bytes,
                "steps": w.steps_served, "tokens": w.tokens_served, "bytes_received": w.bytes_received,
                "slow_factor": self.slow_factor, "slowed_steps": list(self.slowed_steps), "liar": lying(w),
                "caught_at": self.conn.caught_at,
                "rss_bytes": rss, "peak_rss_bytes": hwm,
                "load_failures": list(w.load_failures), "backend": w.backend_name, "adapter": self.adapter_note,
                "network": self.conn.network.name if self.conn.network else None, "loads": list(self.conn.loads),
                "address": self.address}

    # ------------------------------------------------------------------ faults
    def crash(self, code: int = 137) -> None:
        threading.Timer(0.02, os._exit, (code,)).start()  # let this call's reply leave first

    def freeze(self, seconds: float) -> None:
        # a helper outside the process stops and resumes it: no heartbeat, no answer, then resume
        pid = os.getpid()
        subprocess.Popen(["/bin/sh", "-c", f"kill -STOP {pid}; sleep {float(seconds)}; kill -CONT {pid}"],
                         start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def slow(self, factor: float, seconds: float | None = None) -> int:
        """Slow every step ending from now on (for ``seconds``); returns this slow-down's index in
        info()["slowed_steps"], which counts the steps that ran slowed by it (none: a tab whose
        pipeline sent it no step in the window was slowed to no effect)."""
        self.slow_factor = self.base_slow * float(factor)
        slow_down(self.worker, self.slow_factor)
        window = len(self.slowed_steps)
        self.slowed_steps.append(0)
        delay = self.worker.compute_delay

        def counted(compute_s: float) -> float:
            self.slowed_steps[window] += 1
            return delay(compute_s)

        self.worker.compute_delay = counted
        if seconds:
            threading.Timer(seconds, self._unslow).start()
        return window

    def _unslow(self) -> None:
        self.slow_factor = self.base_slow
        slow_down(self.worker, self.slow_factor)

    def partition(self, seconds: float) -> None:
        self.conn.partitioned.set()
        threading.Timer(float(seconds), self.conn.partitioned.clear).start()

    def evict(self, reason: str = "tab discarded by the browser") -> None:
        # the browser does not wait for the closing handshake: start the close and return
        asyncio.run_coroutine_threadsafe(self.conn.evict(reason), self.loop)

    def memory_pressure(self, budget_bytes: int) -> list:
        def shrink() -> list:
            refusals = self.worker.shrink_budget(int(budget_bytes))
            # sent before the next step runs, as the browser's single-threaded worker would: a
            # step queued behind this fails ("not held here") and its error must not arrive first
            for m in refusals:
                asyncio.run_coroutine_threadsafe(self.conn.send(m), self.loop).result(5)
            return refusals

        # on the compute thread, after any step in progress
        return [m["detail"] for m in self.conn.in_compute_thread(shrink).result(60)]

    def lie(self, factor: float = 0.05) -> int:
        # read by the compute thread at the end of every step: the next result is already wrong
        lie(self.worker, float(factor))
        return self.worker.steps_served

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.conn.evict("tab closed", code=1000), self.loop)


# ---------------------------------------------------------------------- the public facade
_remote_cls = None
_spawn_ids = itertools.count()  # tabs started as processes by this driver (round robin over the nodes' hosts)


def _remote():
    global _remote_cls
    if _remote_cls is None:
        import ray

        _remote_cls = ray.remote(num_cpus=0, max_restarts=0)(_TabActor)
    return _remote_cls


class SimulatedTab:
    """A browser tab simulated by a process that Ray places: a CPU tab a plain process under its
    node's tab host (actors/tab_host.py), a WebGPU or GPU tab a Ray actor. Ray errors never
    leak: a dead tab raises TabGone, a control call that times out raises TabUnresponsive.
    `address`: the local address its socket is bound to (its device's, somewhere in 127/8; None:
    the system's choice, 127.0.0.1): the coordinator backs joins off per address."""

    def __init__(self, name: str, url: str, token: str, profile: str | Profile = "chrome-desktop-discrete",
                 backend: str | None = None, hidden: bool | None = None, memory_bytes: int | None = None,
                 device_options: dict | None = None, seed: int = 0, actor_options: dict | None = None,
                 num_gpus: float = 0.0, adapter: str | int | None = None, network: str | dict | NetworkProfile | None = None,
                 address: str | None = None):
        prof = get_profile(profile) if isinstance(profile, str) else profile
        if network is not None:  # checked here, before any process starts
            prof = prof.with_(network=get_network(network))
        self.name = name
        self.address = address
        self.profile = prof
        self.backend = backend or prof.backend
        if self.backend == "wgpu" and not prof.webgpu:
            raise TabshardError(f"profile {prof.name} has no WebGPU; use backend 'numpy'")
        self.hidden = prof.hidden if hidden is None else hidden
        self.memory_bytes = int(memory_bytes or prof.memory_bytes)
        # a GPU tab: Ray reserves (a share of) a GPU, and the actor computes on that GPU's adapter
        options = {**(actor_options or {}), **({"num_gpus": float(num_gpus)} if num_gpus else {})}
        device_options = {**(device_options or {}), **({"adapter": adapter} if adapter is not None else {})}
        if self.backend == "numpy":
            # one thread, as a tab's WASM engine has (one Web Worker); dozens of simulated tabs share
            # a few cores, where the packed kernel's thread pool would only contend
            device_options.setdefault("threads", 1)
        args = [name, url, token, prof.to_dict(), self.backend, self.memory_bytes, self.hidden, device_options, seed,
                {k: v for k, v in dataclasses.asdict(prof.network).items() if k != "sources"}, address]
        self._actor = self._host = self._spawned = None
        if self.backend == "numpy" and not options:
            # a CPU tab runs as a plain process started by its node's tab host (actors/tab_host.py):
            # without Ray's runtime in it, a tab takes about half the memory
            from actors import tab_host

            n = next(_spawn_ids)
            self._host = tab_host.host_for(n)
            self._key = f"{name}#{os.getpid()}-{n}"
            self._spawned = self._host.spawn.remote(self._key, args)
        else:  # GPU tabs (Ray assigns their GPU) and WebGPU tabs stay Ray actors
            self._actor = _remote().options(**options).remote(*args)
        self.killed = False

    def _call(self, method: str, *args, timeout: float = 30.0):
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            if self._host is None:
                return ray.get(getattr(self._actor, method).remote(*args), timeout=timeout)
            if self._spawned is not None:  # the host's calls run concurrently: the spawn first
                ray.get(self._spawned, timeout=60)
                self._spawned = None
            kind, value = ray.get(self._host.call.remote(self._key, method, list(args), timeout), timeout=timeout + 10)
        except RayActorError as exc:
            raise TabGone(f"tab {self.name}: its process is gone ({type(exc).__name__})") from None
        except GetTimeoutError:
            raise TabUnresponsive(f"tab {self.name}: no answer to {method} within {timeout:.0f}s") from None
        if kind == "ok":
            return value
        if kind == "gone":
            raise TabGone(f"tab {self.name}: its process is gone ({value})")
        if kind == "timeout":
            raise TabUnresponsive(f"tab {self.name}: no answer to {method} ({value})")
        raise TabshardError(f"tab {self.name}: {method} failed: {value}")

    def pid(self) -> int:
        return self._call("pid")

    def info(self, timeout: float = 30.0) -> dict:
        return self._call("info", timeout=timeout)

    def wait_connected(self, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            i = self.info(timeout=max(1.0, deadline - time.monotonic()))
            if i["connected"]:
                return i
            time.sleep(0.1)
        raise TabUnresponsive(f"tab {self.name} did not join within {timeout:.0f}s")

    def crash(self) -> None:
        self._call("crash")

    def freeze(self, seconds: float) -> None:
        self._call("freeze", seconds)

    def slow(self, factor: float, seconds: float | None = None) -> int:
        """See _TabActor.slow: returns the slow-down's index in info()["slowed_steps"]."""
        return self._call("slow", factor, seconds)

    def partition(self, seconds: float) -> None:
        self._call("partition", seconds)

    def evict(self, reason: str = "tab discarded by the browser") -> None:
        self._call("evict", reason)

    def memory_pressure(self, budget_bytes: int) -> list:
        return self._call("memory_pressure", int(budget_bytes), timeout=90)

    def lie(self, factor: float = 0.05) -> int:
        """Every result from now on is off by `factor` x its RMS (random noise), until the
        coordinator catches the tab (then it leaves). Returns the steps served so far."""
        return self._call("lie", float(factor))

    def kill(self) -> None:
        """End the tab's process (cleanup; not a fault hook -- use crash for that)."""
        import ray

        if not self.killed:
            self.killed = True
            try:
                if self._host is not None:
                    ray.get(self._host.kill.remote(self._key), timeout=30)
                else:
                    ray.kill(self._actor, no_restart=True)
            except Exception:
                pass

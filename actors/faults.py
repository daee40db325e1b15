"""Faults a simulated tab (or a test's in-process worker) can be given, installed through the
worker's public hooks (tab_worker/worker.py: result_filters, compute_delay): the worker itself
knows nothing of them."""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
import weakref

import numpy as np

_LIARS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # worker -> its _Liar


class _Liar:
    """The "liar" fault: subtly wrong activations (or logits), of the right shape, finite:
    noise of `factor` times the result's RMS, on every step's reply."""

    def __init__(self, worker, factor: float):
        self.worker = worker
        self.factor = factor

    def __call__(self, step: dict, reply: dict) -> None:
        rng = np.random.default_rng(self.worker.steps_served)
        for key in ("topk_logits", "output"):
            x = reply.get(key)
            if x is not None and x.size:
                scale = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) or 1.0
                reply[key] = (x + self.factor * scale * rng.standard_normal(x.shape)).astype(np.float32)
                return


def lie(worker, factor: float) -> None:
    """From now on every result `worker` returns is off by `factor` times its RMS (0: honest)."""
    liar = _LIARS.pop(worker, None)
    if liar is not None:
        worker.result_filters.remove(liar)
    if factor:
        _LIARS[worker] = liar = _Liar(worker, float(factor))
        worker.result_filters.append(liar)


def lying(worker) -> float:
    """The noise factor `worker` lies with (0: honest)."""
    liar = _LIARS.get(worker)
    return liar.factor if liar is not None else 0.0


def host_turns(path: str):
    """A compute_turn for TabWorker (tab_worker/worker.py): an exclusive lock on the file at
    `path`, so that the simulated devices of one host given the same path compute one at a time
    (each then sleeps its slowing outside it). Computing at once, they shared this host's memory
    bandwidth, and a step's CPU time, the compute the slowing multiplies, grew with its
    neighbours' traffic, as separate devices' would not."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)

    @contextlib.contextmanager
    def turn():
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    return turn


def slow_down(worker, factor: float, cpu_time: bool = False) -> None:
    """Every step (and speed measurement) of `worker` takes `factor` times its compute time, as on a
    device that much slower (1: full speed). cpu_time: the compute is timed as the CPU time of
    the thread that computes (run the worker on one thread), and a step takes `factor` times that
    whatever its wall time, so that processes sharing this host's cores do not make a simulated
    device of its own slower still."""
    factor = float(factor)
    worker.compute_clock = time.thread_time if cpu_time else time.perf_counter
    worker.compute_delay = None if factor == 1.0 else (lambda compute_s: compute_s * (factor - 1))

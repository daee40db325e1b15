"""The coordinator's own compute, handed to coordinator.server.CoordinatorService by `serve` (the
coordinator never imports the worker): an in-process TabWorker for the stages no tab can hold, the
whole-vocabulary head for sessions whose chooser needs every logit, and backends for a draft model."""
from __future__ import annotations

import numpy as np

from kernels.reference import rmsnorm
from protocol.model_types import HeadWeights
from tab_worker.cpu_kernels import PackedMatrix
from tab_worker.worker import TabWorker, argmax_next, draft_backend


class LocalCompute:
    def __init__(self, backend: str = "numpy"):
        self.backend = backend

    def worker(self, blob_store: dict) -> TabWorker:
        """The coordinator's worker: it holds every blob already (hashed once, by the core)."""
        return TabWorker("coordinator", backend=self.backend, blob_store=blob_store, memory_bytes=64 << 30)

    @staticmethod
    def full_head(head: HeadWeights, eps: float):
        """rows [n, hidden] of the last stage's output -> the whole vocabulary's logits [n, vocab],
        as a numpy worker's head computes them, on the packed weights: not dequantized, SmolLM2's
        49,152 x 576 head reads 28 MB a row instead of 113 MB (benchmarks/bench_grammar.py times it)."""
        matrix = PackedMatrix([head.output], ["output"])
        norm = np.asarray(head.output_norm, np.float32)
        return lambda rows: matrix.apply(np.ascontiguousarray(rmsnorm(np.asarray(rows, np.float32), norm, eps)))

    # coordinator/speculation.py's DraftModel: a numpy backend holding a whole draft model, and
    # its argmax next token (the same two a worker holding a draft model drafts with)
    draft_backend = staticmethod(draft_backend)
    next_token = staticmethod(argmax_next)

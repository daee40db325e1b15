"""Who holds which layers: contiguous ranges in proportion to measured speed, within memory.

Pure functions over worker descriptions; the coordinator re-plans when membership changes
while no session is running, and replaces single stages on failure (see state.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerCapacity:
    worker_id: str
    ms_per_layer: float  # measured when it joined, per layer per decode token
    memory_bytes: int  # budget for weights as the worker will hold them
    expansion: float = 1.0  # bytes held per byte of packed weights (numpy dequantizes to f32)
    local: bool = False  # the coordinator's own compute: last resort only


@dataclass
class StagePlan:
    layer_start: int
    layer_end: int  # exclusive
    include_head: bool
    workers: list[str] = field(default_factory=list)  # primary first, then standbys

    @property
    def layers(self) -> int:
        return self.layer_end - self.layer_start

    def to_dict(self) -> dict:
        return {"layers": [self.layer_start, self.layer_end], "head": self.include_head, "workers": list(self.workers)}


class PlanError(Exception):
    """Not enough capacity for the model."""


def plan(workers: list[WorkerCapacity], n_layers: int, layer_bytes: int, head_bytes: int,
         replicas: int = 1, max_stages: int | None = None, head_cost_layers: float = 0.0) -> list[StagePlan]:
    """Split [0, n_layers) into stages. Every remote worker is used (pipeline parallelism pools
    them) unless `max_stages` caps the hops; with replicas R, workers are grouped into R
    pipelines' worth of stages and each stage gets R holders. The local compute is used only
    when remote workers cannot hold the model.

    head_cost_layers: the final norm + LM head's decode cost in layers (SmolLM2-135M's 49152 x
    576 head weighs as much as 8 of its layers): the head stage takes that many fewer layers,
    so that it is not the pipeline's bottleneck."""
    remote = sorted((w for w in workers if not w.local), key=lambda w: (w.ms_per_layer, w.worker_id))
    local = [w for w in workers if w.local]
    for pool in (remote, remote + local, local):
        if not pool:
            continue
        try:
            return _plan_pool(pool, n_layers, layer_bytes, head_bytes, replicas, max_stages, head_cost_layers)
        except PlanError:
            continue
    raise PlanError(f"the {len(workers)} worker(s) cannot hold {n_layers} layers of {layer_bytes} bytes plus a {head_bytes}-byte head")


def _capacity_layers(w: WorkerCapacity, layer_bytes: int, head: int) -> int:
    return int((w.memory_bytes / w.expansion - head) // max(layer_bytes, 1))


def _plan_pool(pool, n_layers, layer_bytes, head_bytes, replicas, max_stages, head_cost_layers=0.0) -> list[StagePlan]:
    # a worker that cannot hold even one layer serves no stage
    pool = [w for w in pool if _capacity_layers(w, layer_bytes, 0) >= 1]
    if not pool:
        raise PlanError("no worker can hold a single layer")
    replicas = max(1, min(replicas, len(pool)))
    n_stages = max(1, len(pool) // replicas)
    if max_stages:
        n_stages = min(n_stages, max_stages)
    n_stages = min(n_stages, n_layers)
    primaries = pool[:n_stages]
    standbys = pool[n_stages:]
    speed = [1.0 / max(w.ms_per_layer, 1e-6) for w in primaries]
    # proportional split of the work (layers + the head's cost, which the last stage carries),
    # then fix rounding so counts sum to n_layers and each >= 1
    raw = [(n_layers + head_cost_layers) * s / sum(speed) for s in speed]
    if n_stages > 1:
        raw[-1] = max(1.0, raw[-1] - head_cost_layers)
        rest = sum(raw[:-1])
        raw[:-1] = [r * (n_layers - raw[-1]) / rest for r in raw[:-1]]
    else:
        raw = [float(n_layers)]
    counts = [max(1, int(r)) for r in raw]
    while sum(counts) < n_layers:
        i = max(range(n_stages), key=lambda j: raw[j] - counts[j])
        counts[i] += 1
    while sum(counts) > n_layers:
        i = max((j for j in range(n_stages) if counts[j] > 1), key=lambda j: counts[j] - raw[j])
        counts[i] -= 1
    # respect memory: move layers from stages over budget to stages with room (the last
    # stage also holds the head)
    caps = [max(0, _capacity_layers(w, layer_bytes, head_bytes if i == n_stages - 1 else 0)) for i, w in enumerate(primaries)]
    for i in range(n_stages):
        while counts[i] > caps[i]:
            room = [j for j in range(n_stages) if counts[j] < caps[j]]
            if not room:
                raise PlanError("not enough memory")
            j = max(room, key=lambda j: caps[j] - counts[j])
            counts[i] -= 1
            counts[j] += 1
    if counts[-1] == 0:
        raise PlanError("the worker for the head has no room for it")
    stages, start = [], 0
    for i, c in enumerate(counts):
        if c > 0:
            stages.append(StagePlan(start, start + c, i == n_stages - 1, [primaries[i].worker_id]))
            start += c
    # standbys: each stage gets replicas-1 more holders that can fit it
    free = list(standbys)
    for st in stages:
        need = st.layers * layer_bytes + (head_bytes if st.include_head else 0)
        while len(st.workers) < replicas:
            fit = [w for w in free if w.memory_bytes / w.expansion >= need]
            if not fit:
                break
            free.remove(fit[0])
            st.workers.append(fit[0].worker_id)
    return stages

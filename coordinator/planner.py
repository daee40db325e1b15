"""Who holds which layers: the pipeline depth that minimises a token's predicted latency, contiguous
ranges in proportion to measured speed within memory, and serving replicas over the same ranges.

Pure functions over worker descriptions. A token's predicted latency through one pipeline is the sum
over its stages of (layers + the head's cost) x the primary's measured cost per layer, plus each
hop: the worker's measured round trip (DEFAULT_RTT_MS before its first pong) and the hidden state's
transfer both ways at its measured transfer rate (DEFAULT_BYTES_PER_MS until it has one). The depth is the fewest stages memory allows unless a
deeper pipeline is predicted faster (by DEPTH_MIN_GAIN); workers beyond it form more pipelines over
the same ranges (data parallelism: each session runs on one), and every pipeline's primary is a
warm standby for the same range in the others. The coordinator re-plans when membership changes
(coordinator/machine/planning.py) and replaces single stages on failure (machine/recovery.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# before a worker's first pong: a LAN's round trip through two event loops
DEFAULT_RTT_MS = 2.0
# the hidden state's transfer estimate when nothing better is known: 100 Mbit/s
DEFAULT_BYTES_PER_MS = 12_500.0
# a deeper pipeline (more hops) must be predicted this much faster than the shallowest one
DEPTH_MIN_GAIN = 0.05
# a plan re-made from scratch moves weights: the running plan's ranges, split or merged to the new
# depth (a joining tab takes half of one range, nobody else loads anything), are kept unless the
# fresh plan is predicted this much faster
STICKY_MAX_LOSS = 0.15


@dataclass(frozen=True)
class WorkerCapacity:
    worker_id: str
    ms_per_layer: float  # measured when it joined or again while left out (then from its steps), per layer per decode token
    memory_bytes: int  # budget for weights as the worker will hold them
    expansion: float = 1.0  # bytes held per byte of packed weights (numpy dequantizes to f32)
    local: bool = False  # the coordinator's own compute: last resort only
    rtt_ms: float | None = None  # its measured round trip (None: not measured yet)
    flagged: str | None = None  # why its measurements are not trusted: never a primary while others can serve
    bytes_per_ms: float | None = None  # its measured transfer rate (None: not measured yet, the default is assumed)

    def hop_ms(self, hidden_bytes: int, bytes_per_ms: float = DEFAULT_BYTES_PER_MS) -> float:
        """A step's hop to it and back: its round trip and the hidden state's transfer both ways
        (at its own measured rate where there is one, else at bytes_per_ms)."""
        if self.local:
            return 0.0
        rtt = DEFAULT_RTT_MS if self.rtt_ms is None else self.rtt_ms
        return rtt + 2 * hidden_bytes / (self.bytes_per_ms or bytes_per_ms)


@dataclass
class StagePlan:
    layer_start: int
    layer_end: int  # exclusive
    include_head: bool
    workers: list[str] = field(default_factory=list)  # primary first, then standbys
    pipeline: int = 0

    @property
    def layers(self) -> int:
        return self.layer_end - self.layer_start

    def to_dict(self) -> dict:
        return {"layers": [self.layer_start, self.layer_end], "head": self.include_head, "workers": list(self.workers),
                "pipeline": self.pipeline}


@dataclass
class Plan:
    pipelines: list[list[StagePlan]]  # the first is predicted fastest
    predicted_ms: list[float]  # a token's predicted latency through each pipeline, alone
    notes: dict[str, str] = field(default_factory=dict)  # worker -> its role, or why it is off the critical path
    why: dict[str, str] = field(default_factory=dict)  # worker off every pipeline's critical path -> why, alone

    @property
    def stages(self) -> list[StagePlan]:
        return [sp for p in self.pipelines for sp in p]

    @property
    def depth(self) -> int:
        return len(self.pipelines[0]) if self.pipelines else 0


class PlanError(Exception):
    """Not enough capacity for the model."""


@dataclass(frozen=True)
class Model:
    """What a plan is made for: layer count, sizes, the head's decode cost in layers and the hidden
    state's bytes per token."""
    n_layers: int
    layer_bytes: int
    head_bytes: int
    head_cost_layers: float = 0.0
    hidden_bytes: int = 0
    current: tuple = ()  # the running plan's first pipeline: (layer_start, layer_end, primary)
    running: tuple = ()  # every running pipeline (the first too), each a tuple of (layer_start, layer_end, primary)
    held: dict = field(default_factory=dict, hash=False, compare=False)  # worker -> layers it holds (n_layers: the head)

    def missing(self, wid: str, a: int, b: int, head: bool) -> int:
        """Bytes `wid` must load to hold layers [a, b) (and the head)."""
        have = self.held.get(wid, frozenset())
        return (sum(self.layer_bytes for i in range(a, b) if i not in have)
                + (self.head_bytes if head and self.n_layers not in have else 0))


def plan(workers: list[WorkerCapacity], n_layers: int, layer_bytes: int, head_bytes: int,
         replicas: int = 1, max_stages: int | None = None, head_cost_layers: float = 0.0,
         stages: int | None = None, hidden_bytes: int = 0, bytes_per_ms: float = DEFAULT_BYTES_PER_MS,
         current: list[tuple[int, int, str]] | None = None, held: dict[str, frozenset] | None = None,
         running: list[list[tuple[int, int, str]]] | None = None) -> Plan:
    """The plan with the lowest predicted token latency: `stages` fixes the depth (as far as there are
    workers), `max_stages` caps it; `replicas`: holders each range gets at least (a pipeline's
    primaries count for the same range in the others; workers left over fill the rest). The
    coordinator's compute (local) is planned only when the remote workers cannot hold the model.

    head_cost_layers: the final norm + LM head's decode cost in layers (SmolLM2-135M's 49152 x
    576 head weighs as much as 8 of its layers): the head stage takes that many fewer layers,
    so that it is not the pipeline's bottleneck.

    current: the running plan's first pipeline as (layer_start, layer_end, primary); held: the
    layers each worker holds now (n_layers standing for the head). A plan that moves few weights
    is preferred (STICKY_MAX_LOSS): the running ranges split or merged to the new depth, each
    replica's and standby's range one it already holds where there is a choice. running: every
    running pipeline (the first too), as `current`: one whose ranges the new plan keeps and
    whose primaries are all free and trusted stays as it is, as a replica (its sessions' KV
    stays where it is: a join that only adds a replica moves no session)."""
    model = Model(n_layers, layer_bytes, head_bytes, head_cost_layers, hidden_bytes, tuple(current or ()),
                  tuple(tuple(p) for p in running or ()), held or {})
    remote = [w for w in workers if not w.local]
    local = [w for w in workers if w.local]
    for pool in (remote, remote + local, local):
        if not pool:
            continue
        try:
            return _plan_pool(pool, model, replicas, max_stages, stages, bytes_per_ms)
        except PlanError:
            continue
    raise PlanError(f"the {len(workers)} worker(s) cannot hold {n_layers} layers of {layer_bytes} bytes plus a {head_bytes}-byte head")


def _capacity_layers(w: WorkerCapacity, layer_bytes: int, head: int) -> int:
    return int((w.memory_bytes / w.expansion - head) // max(layer_bytes, 1))


def _alone_ms(w: WorkerCapacity, m: Model, bytes_per_ms: float) -> float:
    """A token's latency were `w` to hold the whole model (memory aside): how workers are ranked."""
    return _finite(w.ms_per_layer) * (m.n_layers + m.head_cost_layers) + w.hop_ms(m.hidden_bytes, bytes_per_ms)


def _finite(x: float) -> float:
    return x if isinstance(x, (int, float)) and math.isfinite(x) and x > 0 else 1e9


def predict_ms(pipeline: list[tuple[WorkerCapacity, int, bool]], m: Model, bytes_per_ms: float = DEFAULT_BYTES_PER_MS) -> float:
    """A token's predicted latency through stages of (primary, layers, holds the head)."""
    return sum(_finite(w.ms_per_layer) * (n + (m.head_cost_layers if head else 0)) + w.hop_ms(m.hidden_bytes, bytes_per_ms)
               for w, n, head in pipeline)


def _plan_pool(pool, m: Model, replicas, max_stages, stages, bytes_per_ms) -> Plan:
    # a worker that cannot hold even one layer serves no stage
    notes = {w.worker_id: "cannot hold a single layer" for w in pool if _capacity_layers(w, m.layer_bytes, 0) < 1}
    why = dict(notes)
    pool = [w for w in pool if _capacity_layers(w, m.layer_bytes, 0) >= 1]
    if not pool:
        raise PlanError("no worker can hold a single layer")
    # untrusted measurements last: they are never on the critical path while others can serve
    ranked = sorted(pool, key=lambda w: (w.flagged is not None, _alone_ms(w, m, bytes_per_ms), w.worker_id))
    trusted = [w for w in ranked if w.flagged is None] or ranked
    top = min(len(trusted), m.n_layers, max_stages or len(trusted))
    depths = [min(stages, top)] if stages else range(1, top + 1)
    best = None  # (predicted ms, depth, primaries, counts)
    tried: dict[int, float] = {}  # depth -> its best predicted latency
    for d in depths:
        # the d fastest, and (when memory is what is short) the d with the most memory
        roomy = sorted(trusted, key=lambda w: (-_capacity_layers(w, m.layer_bytes, 0), _alone_ms(w, m, bytes_per_ms)))[:d]
        for chosen in (trusted[:d], sorted(roomy, key=lambda w: ranked.index(w))):
            try:
                counts = _split(chosen, m)
            except PlanError:
                continue
            ms = predict_ms([(w, c, i == d - 1) for i, (w, c) in enumerate(zip(chosen, counts))], m, bytes_per_ms)
            tried[d] = min(ms, tried.get(d, ms))
            # the fewest stages unless a deeper pipeline is predicted materially faster
            if best is None or ms < best[0] * (1 - DEPTH_MIN_GAIN if d > best[1] else 1):
                best = (ms, d, list(chosen), counts)
    if best is None:
        raise PlanError("not enough memory")
    sticky = _sticky(best[1], trusted, m, bytes_per_ms) if m.current else None
    if sticky is not None and sticky[0] <= best[0] * (1 + STICKY_MAX_LOSS):
        best = sticky
    first_ms, depth, primaries, counts = best
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    pipelines = [[StagePlan(a, b, i == depth - 1, [w.worker_id]) for i, ((a, b), w) in enumerate(zip(bounds, primaries))]]
    predicted = [first_ms]
    for i, w in enumerate(primaries):
        notes[w.worker_id] = f"pipeline 0, stage {i}"
    free = [w for w in ranked if w not in primaries]
    need = [(b - a) * m.layer_bytes + (m.head_bytes if i == depth - 1 else 0) for i, (a, b) in enumerate(bounds)]

    def fits(w, i):
        return w.memory_bytes / w.expansion >= need[i]

    def add_replica(chosen):
        p = len(pipelines)
        pipelines.append([StagePlan(a, b, i == depth - 1, [w.worker_id], p) for i, ((a, b), w) in enumerate(zip(bounds, chosen))])
        predicted.append(predict_ms([(w, b - a, i == depth - 1) for i, ((a, b), w) in enumerate(zip(bounds, chosen))], m, bytes_per_ms))
        for i, w in enumerate(chosen):
            notes[w.worker_id] = (f"replica: pipeline {p}, stage {i} (predicted {predicted[-1]:.3g} ms a token "
                                  f"against {first_ms:.3g} ms for pipeline 0)")
            free.remove(w)

    # serving replicas: more pipelines over the same ranges, from trusted workers only; first the
    # running replicas that fit the new ranges whole (choosing afresh among workers that hold a
    # range already, the fastest first, re-paired them whenever two tabs' measured speeds swapped
    # places: every session on them moved, for nothing)
    for running in m.running:
        by_id = {w.worker_id: w for w in free}
        kept = [by_id.get(wid) for _, _, wid in running]
        if ([(a, b) for a, b, _ in running] != bounds or any(w is None or w.flagged is not None for w in kept)
                or len({w.worker_id for w in kept}) < depth or not all(fits(w, i) for i, w in enumerate(kept))):
            continue
        add_replica(kept)
    while True:
        chosen, rest = [], [w for w in free if w.flagged is None]
        for i in range(depth):
            # the fastest worker left that fits this range and has the least of it to load
            # (ranges in order: the head's, the roomiest, last)
            a, b = bounds[i]
            w = min((x for x in rest if fits(x, i)), key=lambda x: m.missing(x.worker_id, a, b, i == depth - 1), default=None)
            if w is None:
                break
            chosen.append(w)
            rest.remove(w)
        if len(chosen) < depth:
            break
        add_replica(chosen)
    # every pipeline's primary is a warm standby for the same range in the others
    for i in range(depth):
        primaries_i = [p[i].workers[0] for p in pipelines]
        for p in pipelines:
            p[i].workers += [wid for wid in primaries_i if wid != p[i].workers[0]]
    # left over: standbys where a range has fewer than `replicas` holders, else where the fewest are
    # (those that already hold a range of this plan first: a newcomer takes what is left, so a join
    # does not reshuffle the standbys)
    for w in sorted(free, key=lambda w: min(m.missing(w.worker_id, *bounds[i], i == depth - 1) for i in range(depth))):
        room = [i for i in range(depth) if fits(w, i)]
        why[w.worker_id] = _why_left_out(w, primaries, m, bytes_per_ms, depth, len(pipelines), tried)
        if not room:
            notes[w.worker_id] = f"unused: cannot hold any range of this plan; {why[w.worker_id]}"
            continue
        i = min(room, key=lambda i: (len(pipelines[0][i].workers), m.missing(w.worker_id, *bounds[i], i == depth - 1)))
        if replicas > 1 and len(pipelines[0][i].workers) >= replicas:
            notes[w.worker_id] = f"unused: every range has {replicas} holders; {why[w.worker_id]}"
            continue
        for p in pipelines:
            p[i].workers.append(w.worker_id)
        notes[w.worker_id] = f"standby for layers {bounds[i][0]}-{bounds[i][1] - 1}: {why[w.worker_id]}"
    return Plan(pipelines, predicted, notes, why)


def _sticky(depth: int, trusted: list[WorkerCapacity], m: Model, bytes_per_ms: float):
    """The running plan's ranges brought to `depth` (the costliest range split in two, or the
    cheapest adjacent pair merged, until it has that many), each kept by its primary where it is
    still trusted, the others given to the fastest free worker with the least to load: (predicted
    ms, depth, primaries, layer counts), or None when they do not fit."""
    by_id = {w.worker_id: w for w in trusted}
    stages = [[a, b, by_id.get(p)] for a, b, p in m.current]
    if not stages or stages[0][0] != 0 or stages[-1][1] != m.n_layers:
        return None

    def cost(st):
        return (st[1] - st[0]) * (_finite(st[2].ms_per_layer) if st[2] else 1.0)

    while len(stages) > depth:
        i = min(range(len(stages) - 1), key=lambda i: cost(stages[i]) + cost(stages[i + 1]))
        a, b = stages[i], stages[i + 1]
        keep = min((x for x in (a[2], b[2]) if x), key=lambda x: _finite(x.ms_per_layer), default=None)
        stages[i:i + 2] = [[a[0], b[1], keep]]
    while len(stages) < depth:
        i = max((i for i in range(len(stages)) if stages[i][1] - stages[i][0] > 1), key=lambda i: cost(stages[i]), default=None)
        if i is None:
            return None
        a, b, p = stages[i]
        mid = (a + b) // 2
        # the primary keeps the half with the head (the newcomer loads less), else the first half
        stages[i:i + 1] = [[a, mid, None], [mid, b, p]] if i == len(stages) - 1 else [[a, mid, p], [mid, b, None]]
    # a worker is primary on one stage only: after a failover the running pipeline may have one
    # worker serving two ranges (it covered a dead tab's); it keeps the first, the others go free
    used = set()
    for st in stages:
        if st[2] is not None and st[2].worker_id in used:
            st[2] = None
        elif st[2] is not None:
            used.add(st[2].worker_id)
    for i, st in enumerate(stages):
        head = i == len(stages) - 1
        if st[2] is not None and st[2].memory_bytes / st[2].expansion < (st[1] - st[0]) * m.layer_bytes + (m.head_bytes if head else 0):
            used.discard(st[2].worker_id)
            st[2] = None
    for i, st in enumerate(stages):
        if st[2] is not None:
            continue
        head = i == len(stages) - 1
        need = (st[1] - st[0]) * m.layer_bytes + (m.head_bytes if head else 0)
        free = [w for w in trusted if w.worker_id not in used and w.memory_bytes / w.expansion >= need]
        if not free:
            return None
        st[2] = min(free, key=lambda w: (m.missing(w.worker_id, st[0], st[1], head), _alone_ms(w, m, bytes_per_ms)))
        used.add(st[2].worker_id)
    primaries, counts = [st[2] for st in stages], [st[1] - st[0] for st in stages]
    ms = predict_ms([(w, c, i == len(stages) - 1) for i, (w, c) in enumerate(zip(primaries, counts))], m, bytes_per_ms)
    return ms, len(stages), primaries, counts


def _why_left_out(w: WorkerCapacity, primaries: list[WorkerCapacity], m: Model, bytes_per_ms: float, depth: int,
                  n_pipelines: int, tried: dict[int, float]) -> str:
    if w.flagged:
        return f"measurements not trusted ({w.flagged})"
    fastest = primaries[0]
    mine, theirs = _alone_ms(w, m, bytes_per_ms), _alone_ms(fastest, m, bytes_per_ms)
    hop = w.hop_ms(m.hidden_bytes, bytes_per_ms)
    far = f", rtt {hop:.3g} ms a hop" if hop > _finite(w.ms_per_layer) * m.n_layers else ""
    if mine > theirs:
        return f"slower than {fastest.worker_id} ({mine:.3g} ms a token alone against {theirs:.3g}{far})"
    deeper = {d: ms for d, ms in tried.items() if d > depth}
    if deeper:
        d = min(deeper, key=deeper.get)
        return (f"too little memory to hold the model alone; a {d}-stage pipeline was predicted {deeper[d]:.3g} ms "
                f"a token against {tried[depth]:.3g} for {depth}{far}")
    return f"{n_pipelines} pipeline(s) of {depth} stage(s) are full"


def _split(primaries: list[WorkerCapacity], m: Model) -> list[int]:
    """Layers per stage, in proportion to the primaries' speeds (the head's stage carrying the
    head's cost too), moved within memory; PlanError when they cannot hold the model."""
    n_stages, n_layers, head_cost_layers = len(primaries), m.n_layers, m.head_cost_layers
    speed = [1.0 / max(_finite(w.ms_per_layer), 1e-6) for w in primaries]
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
    caps = [max(0, _capacity_layers(w, m.layer_bytes, m.head_bytes if i == n_stages - 1 else 0)) for i, w in enumerate(primaries)]
    for i in range(n_stages):
        while counts[i] > caps[i]:
            room = [j for j in range(n_stages) if counts[j] < caps[j]]
            if not room:
                raise PlanError("not enough memory")
            j = max(room, key=lambda j: caps[j] - counts[j])
            counts[i] -= 1
            counts[j] += 1
    if counts[-1] < 1 or min(counts) < 1:
        raise PlanError("the worker for the head has no room for it")
    return counts

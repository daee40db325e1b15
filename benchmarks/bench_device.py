"""wgpu decode on a GPU machine, at the memory roofline's measure: for a model shape (the
SmolLM2-135M shape with synthetic a4g32 linears and an s8g32 head, or a synthetic LLaMA-7B shape
in any packed format), per workload (1/8/32/64 sessions decoding together, forward_topk: layers,
head and top-k in one submission): step time, tok/s, weight bytes per step / step time as GB/s
and as a fraction of this device's copy bandwidth measured in the same run, dispatches per
token, and the middle stage's hop (upload the rows, read them back, no dispatch). The speed of a
model depends on its shapes and formats, not its values; the real GGUF does not travel to the
device machine. Figures are appended to the benchmark history (tabshard/bench_history.py).

    python benchmarks/bench_device.py [--model smollm2|synthetic:llama-7b] [--formats s3g64,s4g64,s2g64]
        [--variants wgpu-lanes,wgpu] [--rows 1,8,32,64] [--steps 20] [--kernels] [--breakdown] [--history PATH]
        [--json FILE]
    python benchmarks/bench_device.py --append-json FILE   # a device machine's --json into this history

--variants compares matvec lane layouts side by side in one run: "wgpu" is the device's default
(kernels.runner.matmul_tuning), "wgpu-lanes" the default without staging x
(include/qmatvec_staged.wgsl), "wgpu-stage1" staging for one row only, "wgpu-notall" batches of tall matrices not staged
(no MatmulTuning.matvec_tall_batch_wg),
"wgpu-stage-all[wW]" staging batches whatever their k (in workgroups of W), "wgpu-xN" staging N vec4s of
each row a chunk, "wgpu-blocks" the whole-block walk (SPAN=8, OPT=1: the layout
before include/qmatvec_lanes.wgsl), "wgpu-sSoO[tT][wW]" SPAN=S and OPT=O (0: by shape; at most T threads
per output, workgroups of W), "wgpu-mmN" the tiled qmatmul above N rows, "wgpu-unfused" the default
without the fused decode kernels, "wgpu-f16" the matvecs on their _f16 kernels, "wgpu-planes3"
3-bit weights uploaded as bit planes (the blobs' layout) instead of repacked for the matvecs (contiguous
codes; the high plane spread for i8: "wgpu-i8-planes3"),
"wgpu-i8[wW][gG][oO][tT][kK]" the matvecs on their _i8 kernels (workgroups of W threads, at most G
workgroups a batch row, O outputs a thread for rows of at least K inputs, at most T threads an
output at one row: benchmarks/device_measures.variant_tuning),
"wgpu-attn1" attention's parts walking one key a step (KEYS_AT_ONCE = 1), "wgpu-attnwN" attention
in workgroups of N threads, "wgpu-kvN" split-K attention in N key runs a row whatever the KV
pools' length (wgpu-kv1: unsplit; the default splits by the pools' length),
"wgpu-blockwait" readbacks waited for blocking in the driver instead of spinning (runner.SPIN_WAIT),
"wgpu-mapwait" readbacks left to map_sync (wgpu-py's poll thread; what the spinning wait amounted to
before it spun on the map),
"wgpu-noahead" no decode step's command buffer recorded ahead (runner.ENCODE_AHEAD); any of
them + "-nosg" (e.g. "wgpu-nosg", "wgpu-i8-nosg") with the matvecs' lanes summed in workgroup
memory instead of by subgroup shuffles (MatmulTuning.matvec_subgroup = 0). --kernels first times each matvec of the model's shapes alone
per layout (several copies of each matrix cycled so that L2 does not hold them).

--backends runs the older comparison instead (decode = forward() then head_topk(); "fused" =
forward_topk(); numpy alongside). --check first compares wgpu with numpy on the SmolLM2-shaped
weights and exits non-zero on a mismatch; --profile breaks a decode step down.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="xdg-"))

import numpy as np  # noqa: E402

from kernels.quant import QuantSpec, quantize_rtn  # noqa: E402
from protocol.model_types import HeadWeights, ModelConfig, ModelWeights, SessionSlice  # noqa: E402
from model.synthetic import random_layer  # noqa: E402
from device_measures import SmClock, copy_gbps, dispatch_floor_us, gpu_bound_ms, read_ms, saturate, variant_tuning, warm_up  # noqa: E402  (beside this file)

SMOLLM2 = ModelConfig(n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536, vocab=49152,
                      rope_base=100000.0, rms_eps=1e-5, context=8192, eos_id=2, bos_id=1)


def synthetic_model(cfg: ModelConfig) -> ModelWeights:
    rng = np.random.default_rng(0)
    emb = quantize_rtn(rng.standard_normal((cfg.vocab, cfg.hidden), dtype=np.float32) * 0.05, QuantSpec(8, 32, True))
    layers = [random_layer(cfg, i) for i in range(cfg.n_layers)]
    return ModelWeights(cfg, emb, layers, HeadWeights(np.ones(cfg.hidden, np.float32), emb))


# --backends names beyond make_backend's: the wgpu backend with an option forced
VARIANTS = {"wgpu-fused": ("wgpu", {"fuse_decode": True}), "wgpu-unfused": ("wgpu", {"fuse_decode": False})}


def bench(backend_name: str, weights: ModelWeights, tokens: int, prompt: int) -> dict:
    from tab_worker.backends import make_backend

    cfg = weights.config
    t0 = time.perf_counter()
    name, options = VARIANTS.get(backend_name, (backend_name, {}))
    be = make_backend(name, cfg, dict(enumerate(weights.layers)), weights.head, max(1024, prompt + tokens + 64), **options)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    # at least 32 rows: the warm-up below needs them whatever --prompt is
    x = rng.standard_normal((max(prompt, 32), cfg.hidden)).astype(np.float32)
    # warm-up covers both kernel sets: batches above the fused-decode limit (16 rows) run the
    # plain ops, smaller ones the fused kernels (pipelines and bind groups are built on first use)
    be.forward([SessionSlice("warm", 0, 32)], x[:32])
    be.forward([SessionSlice("warm", 32, 8)], x[:8])
    be.head_topk(x[:1], 1)
    be.drop_session("warm")
    t0 = time.perf_counter()
    h = be.forward([SessionSlice("s", 0, prompt)], x[:prompt])
    be.head_topk(h[-1:], 1)
    prefill_s = time.perf_counter() - t0
    steps = []
    one = x[:1]
    for i in range(tokens):
        t = time.perf_counter()
        h = be.forward([SessionSlice("s", prompt + i, 1)], one)
        be.head_topk(h, 1)
        steps.append(time.perf_counter() - t)
    # 8 concurrent sessions batched in one step each
    for j in range(8):
        be.forward([SessionSlice(f"b{j}", 0, 16)], x[:16])
    batch_steps = []
    n_batch = max(8, tokens // 4)
    for i in range(n_batch):
        t = time.perf_counter()
        h = be.forward([SessionSlice(f"b{j}", 16 + i, 1) for j in range(8)], np.repeat(one, 8, 0))
        be.head_topk(h, 1)
        batch_steps.append(time.perf_counter() - t)
    fused = {}
    if hasattr(be, "forward_topk"):
        be.forward_topk([SessionSlice("f", 0, prompt)], x[:prompt], 1)  # warm: plans at these row counts
        t0 = time.perf_counter()
        be.forward_topk([SessionSlice("g", 0, prompt)], x[:prompt], 1)
        fused["fused_prefill_tok_s"] = prompt / (time.perf_counter() - t0)
        fsteps = []
        for i in range(tokens):
            t = time.perf_counter()
            be.forward_topk([SessionSlice("f", prompt + i, 1)], one, 1)
            fsteps.append(time.perf_counter() - t)
        fbatch = []
        for i in range(n_batch):
            t = time.perf_counter()
            be.forward_topk([SessionSlice(f"b{j}", 16 + n_batch + i, 1) for j in range(8)], np.repeat(one, 8, 0), 1)
            fbatch.append(time.perf_counter() - t)
        fused.update(fused_decode_tok_s=1 / float(np.median(fsteps)), fused_step_ms_p50=float(np.median(fsteps) * 1000),
                     fused_step_ms_p10=float(np.percentile(fsteps, 10) * 1000),
                     fused_step_ms_p90=float(np.percentile(fsteps, 90) * 1000),
                     fused_batch8_tok_s=8 / float(np.median(fbatch)))
    info = {}
    dev = getattr(be, "device", None) or getattr(be, "dev", None)
    if dev is not None and hasattr(dev, "describe"):
        info["adapter"] = dev.describe()
    return {"backend": backend_name, "load_s": load_s, "prefill_tok_s": prompt / prefill_s,
            "decode_tok_s": 1 / float(np.median(steps)), "decode_step_ms_p50": float(np.median(steps) * 1000),
            "batch8_tok_s": 8 / float(np.median(batch_steps)), **fused, **info}


def check(weights: ModelWeights) -> bool:
    """wgpu against numpy on the same weights: hidden states after prefill and decode, and
    top-k ids and logits from head_topk and from forward_topk. True when all agree."""
    from tab_worker.backends import make_backend

    cfg = weights.config
    gpu, cpu = (make_backend(b, cfg, dict(enumerate(weights.layers)), weights.head, 512) for b in ("wgpu", "numpy"))
    rng = np.random.default_rng(2)
    ok = True

    def compare(what, a, b, rtol=2e-3):
        nonlocal ok
        err = float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))
        good = err < rtol
        ok &= good
        print(f"check {what}: rel err {err:.2e} {'ok' if good else 'MISMATCH'}", flush=True)

    def compare_ids(what, a, b):
        nonlocal ok
        good = bool(np.array_equal(a, b))
        ok &= good
        print(f"check {what}: ids {'equal' if good else f'DIFFER {a.ravel()[:8]} vs {b.ravel()[:8]}'}", flush=True)

    slices = [SessionSlice("p", 0, 12), SessionSlice("q", 0, 5)]
    x = rng.standard_normal((17, cfg.hidden)).astype(np.float32)
    hg, hc = gpu.forward(slices, x), cpu.forward(slices, x)
    compare("prefill hidden (2 sessions, 17 rows)", hg, hc)
    (ig, lg), (ic, lc) = gpu.head_topk(hg[[11, 16]], 5), cpu.head_topk(hc[[11, 16]], 5)
    compare_ids("prefill head_topk top-1", ig[:, 0], ic[:, 0])
    compare("prefill head_topk logits", lg, lc)
    for pos in range(3):
        sl = [SessionSlice("p", 12 + pos, 1), SessionSlice("q", 5 + pos, 1)]
        x = rng.standard_normal((2, cfg.hidden)).astype(np.float32)
        if pos < 2:
            hg, hc = gpu.forward(sl, x), cpu.forward(sl, x)
            compare(f"decode hidden step {pos}", hg, hc)
            (ig, lg), (ic, lc) = gpu.head_topk(hg, 5), cpu.head_topk(hc, 5)
        else:
            ig, lg = gpu.forward_topk(sl, x, 5)
            ic, lc = cpu.head_topk(cpu.forward(sl, x), 5)
        compare_ids(f"decode top-1 step {pos}{' (forward_topk)' if pos == 2 else ''}", ig[:, 0], ic[:, 0])
        compare(f"decode logits step {pos}", lg, lc)
    x = rng.standard_normal((9, cfg.hidden)).astype(np.float32)
    sl = [SessionSlice("r", 0, 9)]
    ig, lg = gpu.forward_topk(sl, x, 5)
    ic, lc = cpu.head_topk(cpu.forward(sl, x)[-1:], 5)
    compare_ids("forward_topk prefill top-1", ig[:, 0], ic[:, 0])
    compare("forward_topk prefill logits", lg, lc)
    # past 256 positions: attention walks more than one chunk of keys on some devices
    x = rng.standard_normal((300, cfg.hidden)).astype(np.float32)
    sl = [SessionSlice("long", 0, 300)]
    compare("prefill hidden (300 rows)", gpu.forward(sl, x), cpu.forward(sl, x))
    x = rng.standard_normal((1, cfg.hidden)).astype(np.float32)
    sl = [SessionSlice("long", 300, 1)]
    ig, lg = gpu.forward_topk(sl, x, 5)
    ic, lc = cpu.head_topk(cpu.forward(sl, x), 5)
    compare_ids("forward_topk decode at position 300 top-1", ig[:, 0], ic[:, 0])
    compare("forward_topk decode at position 300 logits", lg, lc)
    return ok


def profile(weights: ModelWeights, steps: int = 100, variant: str = "wgpu") -> None:
    """Where a forward_topk decode step's time goes (wgpu, the --variants name's tuning and
    options): host-side phases, GPU-bound throughput (steps submitted back to back, one wait),
    and the wait strategies."""
    from kernels import runner as R
    from tab_worker import wgpu_backend as W

    cfg = weights.config
    dev = R.shared_device()
    tuning, options = variant_tuning(dev, variant)
    be = W.WgpuBackend(cfg, dict(enumerate(weights.layers)), weights.head, 4096, device=dev, tuning=tuning, **options)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, cfg.hidden)).astype(np.float32)
    be.forward_topk([SessionSlice("s", 0, 64)], x, 1)
    one = x[:1]
    pos = [64]

    def step():
        be.forward_topk([SessionSlice("s", pos[0], 1)], one, 1)
        pos[0] += 1

    def med(fn, n=steps):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts) * 1000)

    for _ in range(10):
        step()
    rows_plan = be._plan(("forward_topk", "h", 1, None), lambda: None, 1)
    topk = be._topk[1]
    print(f"profile: {sum(1 for i in rows_plan if i.__class__ is tuple)} dispatches per decode token", flush=True)
    for wait in (True, False):
        R.WAIT_IN_CALLER = wait
        print(f"profile: full step (WAIT_IN_CALLER={wait}) p50 {med(step):.3f} ms", flush=True)
    R.WAIT_IN_CALLER = True

    def prepare():
        be._prepare([SessionSlice("s", pos[0] - 1, 1)], one)
    print(f"profile: _prepare (checks, slots, positions) p50 {med(prepare):.3f} ms", flush=True)
    slots = np.zeros(1, np.uint32)
    positions = np.array([pos[0] - 1], np.uint32)
    print(f"profile: _stage_rows (3 buffer writes) p50 {med(lambda: be._stage_rows(one, positions, slots)):.3f} ms", flush=True)
    for every in (0, 32, 64, 128):
        def rec(every=every):
            be.dev.execute(rows_plan, submit_every=every)
        t_rec = med(rec, 30)
        be.dev.read(topk.ids, np.uint32, count=1)
        t0 = time.perf_counter()
        for _ in range(30):
            be.dev.execute(rows_plan, submit_every=every)
        t_sub = (time.perf_counter() - t0) * 1000 / 30
        be.dev.device._poll_wait()
        t_all = (time.perf_counter() - t0) * 1000 / 30
        print(f"profile: submit_every={every}: record+submit {t_rec:.3f} ms (p50); 30 back to back: "
              f"{t_sub:.3f} ms/step to submit, {t_all:.3f} ms/step until the GPU is done (GPU-bound rate)", flush=True)
    nbytes = 8

    def wait_only():
        be.dev.execute([], readback=[(topk.ids, 0, nbytes)])
    print(f"profile: empty submit + readback round trip p50 {med(wait_only):.3f} ms", flush=True)
    plan_t = med(lambda: be.dev.plan([*be._layer_ops, *be._head_launchers("h", 1)], 1), 20)
    print(f"profile: building the plan (what each step cost before plans) p50 {plan_t:.3f} ms", flush=True)
    kernel_breakdown(be, rows_plan)


def kernel_breakdown(be, rows_plan: list, reps: int = 30, label: str = "") -> dict:
    """GPU time of each kernel's share of a decode step: that kernel's dispatches alone, `reps`
    steps' worth submitted back to back, one wait (in-stream copies left out). The shares add
    up to more than a full step when dispatches overlap in the full one."""
    groups: dict[str, list] = {}
    for item in rows_plan:
        if item.__class__ is tuple:
            groups.setdefault(item[5].label or "?", []).append(item)

    def gpu_ms(plan):
        return gpu_bound_ms(be.dev, plan, reps, warm_s=0.1)

    empty = gpu_ms([])
    full = gpu_ms([i for i in rows_plan if i.__class__ is tuple])
    print(f"profile:{label} kernels: full step {full:.3f} ms GPU-bound, empty submit {empty:.3f} ms", flush=True)
    out = {"full_ms": full, "empty_ms": empty, "kernels": {}}
    for name, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        t = gpu_ms(items)
        out["kernels"][name] = {"count": len(items), "ms": t}
        print(f"profile:{label} kernel {name:60s} x{len(items):3d}  {t:.3f} ms/step  {1000 * (t - empty) / len(items):.1f} us each", flush=True)
    return out



# ---------------------------------------------------------------------- roofline workloads
def model_weights(model: str, fmt: str | None) -> ModelWeights:
    """The SmolLM2-135M shape ("smollm2"; a4g32, s8g32 head) or a synthetic model's shape
    ("synthetic:llama-7b") with every linear and the head in ``fmt`` (default s3g64)."""
    if model == "smollm2":
        return synthetic_model(SMOLLM2)
    from model.synthetic import _HEAD, CONFIGS, PREFIX, random_layer, random_matrix

    name = model[len(PREFIX):] if model.startswith(PREFIX) else model
    if name not in CONFIGS:
        raise SystemExit(f"unknown model {model!r}: smollm2 or synthetic:{'|'.join(CONFIGS)}")
    cfg, spec = CONFIGS[name], QuantSpec.parse(fmt or "s3g64")
    layers = [random_layer(cfg, i, 0, spec) for i in range(cfg.n_layers)]
    head = HeadWeights(np.ones(cfg.hidden, np.float32), random_matrix(cfg.vocab, cfg.hidden, [0, _HEAD, 0], spec))
    return ModelWeights(cfg, None, layers, head)


def weight_bytes(weights: ModelWeights) -> int:
    """Packed bytes a decode step reads: every layer's linears and the head."""
    total = sum(getattr(layer, m).nbytes for layer in weights.layers for m in type(layer).MATRICES)
    return total + (weights.head.output.nbytes if weights.head else 0)


# untimed decode steps at most before the timed ones: the KV context a workload needs is
# prompt + WARM_STEPS + steps (a long --prompt ran past the backend's 1024 positions)
WARM_STEPS = 256


def decode_workload(be, cfg: ModelConfig, rows: int, steps: int, prompt: int, rng, warm_s: float = 0.5) -> dict:
    """``rows`` sessions (a prompt of ``prompt`` tokens each, prefilled together) decoding
    together: forward_topk steps of one row each, after untimed ones for at least 2 steps and
    ``warm_s`` seconds or WARM_STEPS steps (right after a 7B upload an H200 ran 1-row steps 3x
    slower for ~0.2 s), then the step's plan replayed back to back for 0.25 s: an H200 decoding
    one row of SmolLM2 stayed at its idle 345 MHz clock through the warm-up steps (6.3 ms a
    step, 2.4 ms at 1980 MHz after an 8-row workload), so a lone row's load does not raise it."""
    ids = [f"r{rows}.{j}" for j in range(rows)]
    x = (rng.standard_normal((rows * prompt, cfg.hidden)) * 0.5).astype(np.float32)
    be.forward_topk([SessionSlice(s, 0, prompt) for s in ids], x, 1)
    one = x[:rows]
    pos = prompt

    def step():
        nonlocal pos
        be.forward_topk([SessionSlice(s, pos, 1) for s in ids], one, 1)
        pos += 1

    t0 = time.perf_counter()
    while pos - prompt < 2 or (time.perf_counter() - t0 < warm_s and pos - prompt < WARM_STEPS):
        step()
    cached = be._plans.get(("forward_topk", "h", 1, None))
    plan = cached[2] if cached else []
    if plan:
        saturate(be.dev, plan, 0.25)
    times = []
    with SmClock() as clock:  # sampled over the timed steps
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    out = {"rows": rows, "step_ms": [t * 1000 for t in times], "sm_mhz": clock.median,
           "dispatches": sum(1 for item in plan if item.__class__ is tuple),
           "gpu_ms": gpu_bound_ms(be.dev, plan) if plan else float("nan"), "plan": plan}
    for s in ids:
        be.drop_session(s)
    return out


def hop_ms(be, rows: int, reps: int = 30) -> float:
    """A middle stage's hop without its layers: upload ``rows`` hidden rows and read them back
    (one write, one submission with the readback copy, one wait), median ms."""
    dev, buf, stride = be.dev, be._buf["h"], be._strides["h"]
    x = np.ones((rows, stride), np.float32)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dev.write(buf, x)
        dev.execute([], readback=[(buf, 0, rows * stride * 4)])
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def kernel_table(dev, weights: ModelWeights, variants: list[str], rows_list: list[int], reps: int = 5) -> list[dict]:
    """Each distinct linear of the model's layer, and the head's, alone, per lane layout and row count: ms per
    matvec and GB/s of packed weights. Copies of the matrix are cycled (>= 256 MB in all) so
    the timing reads memory, not L2."""
    import dataclasses


    from kernels import launchers as KL
    from tab_worker.wgpu_backend import _fused_parts

    layer = weights.layers[0]
    mats = {"qkv": _fused_parts([layer.wq, layer.wk, layer.wv])[0][0], "wo": layer.wo,
            "gate_up": _fused_parts([layer.w_gate, layer.w_up])[0][0], "down": layer.w_down}
    if weights.head is not None:  # the output matvec (SmolLM2's: the largest matrix, 8-bit)
        mats["head"] = weights.head.output
    out = []
    for name, w in mats.items():
        copies = max(1, min(32, -(-(256 << 20) // w.nbytes)))
        gw = KL.upload_quant(dev, w, name)
        bufs = [gw] + [KL.upload_quant(dev, w, f"{name}.{i}") for i in range(1, copies)]
        # the clock fell while the host packed the copies (3-bit: repacked contiguous, seconds)
        warm_up(dev, 0.5)
        # the codes alone, read by a kernel that does nothing else: the floor a matvec of this size meets
        floor = read_ms(dev, [q for g in bufs for _, _, q, _ in g.chunks])
        codes = sum(q.size for _, _, q, _ in gw.chunks)
        print(f"kernel {name:>7} {w.n:>5}x{w.k:<5} {'codes read':>14}        : {floor * 1000:8.1f} us "
              f"{codes / floor / 1e6:7.1f} GB/s", flush=True)
        rmax = max(rows_list)
        xb = dev.upload(np.random.default_rng(5).standard_normal((rmax, w.k)).astype(np.float32))
        yb = dev.buffer(rmax * w.n * 4)
        for variant in variants:
            tuning, options = variant_tuning(dev, variant)
            if options:
                continue
            tuning = dataclasses.replace(tuning, matvec_max_rows=1 << 30)
            ops = [KL.QuantLinear(dev, g, xb, w.k, yb, w.n, tuning=tuning) for g in bufs]
            for rows in rows_list:
                ms = gpu_bound_ms(dev, dev.plan(ops, rows), reps) / copies
                row = {"matrix": name, "n": w.n, "k": w.k, "variant": variant, "rows": rows, "ms": ms,
                       "gbps": w.nbytes / ms / 1e6, "codes_read_ms": floor}
                out.append(row)
                print(f"kernel {name:>7} {w.n:>5}x{w.k:<5} {variant:>14} rows {rows:>2}: {ms * 1000:8.1f} us "
                      f"{row['gbps']:7.1f} GB/s = {ms / floor:5.2f}x the codes' read", flush=True)
        for g in bufs:
            for _, _, q, sc in g.chunks:
                q.destroy()
                sc.destroy()
    return out


def roofline(a) -> int:
    from kernels import runner as R
    from tab_worker.wgpu_backend import WgpuBackend

    dev = R.get_device()
    print(f"device: {dev.describe()} (real GPU: {dev.is_real_gpu()}; features: {', '.join(sorted(dev.features))})", flush=True)
    copy_bytes = min(1 << 30 if dev.is_real_gpu() else 64 << 20, dev.limits["max-buffer-size"] // 16 * 16)
    warm_up(dev, a.warm_up)
    copies = copy_gbps(dev, copy_bytes)
    copy = max(copies.values())
    print(f"copy bandwidth: {copy:.0f} GB/s (read + write, {copy_bytes >> 20} MiB buffers; copy command "
          f"{copies['command']:.0f}, vec4 shader {copies['shader']:.0f})", flush=True)
    floor_us = dispatch_floor_us(dev)
    print(f"dispatch floor: {floor_us:.2f} us a dispatch (a chain of one-workgroup dispatches, each on the one before)",
          flush=True)
    rows_list = [int(r) for r in a.rows.split(",")]
    variants = (a.variants or "wgpu-blocks,wgpu").split(",")
    formats = a.formats.split(",") if a.formats else [None]
    from tabshard.bench_history import machine

    results = {"device": dev.describe(), "machine": {**machine(adapter=False), "adapter": dev.describe()}, "copy_gbps": copy, "copy_gbps_by": copies, "dispatch_floor_us": floor_us, "model": a.model, "prompt": a.prompt, "workloads": [], "kernels": [], "hops": {}}
    rng = np.random.default_rng(1)
    for fmt in formats:
        t0 = time.perf_counter()
        weights = model_weights(a.model, fmt)
        cfg, wbytes = weights.config, weight_bytes(weights)
        label = f"{a.model}" + (f" {fmt}" if fmt else "")
        print(f"{label}: {wbytes / 1e9:.3f} GB of packed weights per step, generated in {time.perf_counter() - t0:.1f}s",
              flush=True)
        if a.kernels:
            results["kernels"] += [{"format": fmt, **r} for r in kernel_table(dev, weights, variants, [1, 8])]
        for variant in variants:
            tuning, options = variant_tuning(dev, variant)
            R.SPIN_WAIT = variant not in ("wgpu-blockwait", "wgpu-mapwait")
            R.WAIT_IN_CALLER = variant != "wgpu-mapwait"
            R.ENCODE_AHEAD = variant != "wgpu-noahead"
            t0 = time.perf_counter()
            ctx = max(1024, a.prompt + WARM_STEPS + a.steps + 8)
            be = WgpuBackend(cfg, dict(enumerate(weights.layers)), weights.head, ctx, device=dev, tuning=tuning, **options)
            load_s = time.perf_counter() - t0
            warm_up(dev, min(1.0, a.warm_up))  # the clock fell while the host built the weights (H200: the first workload 2x slow)
            for rows in rows_list:
                ahead = dev.encoded_ahead_used
                r = decode_workload(be, cfg, rows, a.steps, a.prompt, rng)
                step = float(np.median(r["step_ms"]))
                gbps = wbytes / step / 1e6
                row = {"format": fmt, "variant": variant, "rows": rows, "step_ms": step, "tok_s": rows * 1000 / step,
                       "gbps": gbps, "copy_fraction": gbps / copy, "gpu_ms": r["gpu_ms"], "dispatches": r["dispatches"],
                       "load_s": load_s, "samples_ms": r["step_ms"], "sm_mhz": r["sm_mhz"],
                       "encoded_ahead": dev.encoded_ahead_used - ahead}
                results["workloads"].append(row)
                if a.breakdown and rows == rows_list[0]:
                    row["breakdown"] = kernel_breakdown(be, r["plan"], label=f" {label} {variant} rows {rows}")
                print(f"{label:>24} {variant:>14} rows {rows:>2}: step {step:7.2f} ms (GPU-bound {r['gpu_ms']:7.2f}) "
                      f"{row['tok_s']:8.0f} tok/s | weights {gbps:6.0f} GB/s = {100 * row['copy_fraction']:5.1f}% of copy "
                      f"| {r['dispatches']} dispatches/step | {row['encoded_ahead']} recorded ahead"
                      + (f" | SM {r['sm_mhz']:.0f} MHz" if r["sm_mhz"] else ""), flush=True)
            if variant == variants[0]:
                hops = {rows: hop_ms(be, rows) for rows in (1, 8, 64) if rows <= be._rows_cap}
                results["hops"][label] = hops
                print(f"{label:>24} middle-stage hop (upload rows + readback, no dispatch): "
                      + ", ".join(f"{r} rows {ms:.3f} ms" for r, ms in hops.items()), flush=True)
            del be
            import gc
            gc.collect()
        del weights
    print("summary: format variant rows | step ms | tok/s | GB/s | % copy | dispatches")
    for w in results["workloads"]:
        print(f"  {w['format'] or '-':>6} {w['variant']:>14} {w['rows']:>2} | {w['step_ms']:7.2f} | {w['tok_s']:8.0f} | "
              f"{w['gbps']:6.0f} | {100 * w['copy_fraction']:5.1f} | {w['dispatches']}")
    if a.json:
        Path(a.json).write_text(json.dumps(results))
    if a.history != "none":
        append_history(results, a.history)
    return 0


def append_history(results: dict, path: str) -> None:
    from tabshard.bench_history import DEFAULT_DB, Figure, append_figures, recorded_machine

    figures = [Figure.of("device.copy_gbps", [results["copy_gbps"]], "GB/s", "higher")]
    if "dispatch_floor_us" in results:  # (runs before it was measured have none)
        figures.append(Figure.of("device.dispatch_floor_us", [results["dispatch_floor_us"]], "us", "lower"))
    model = results["model"].replace("synthetic:", "")
    if results.get("prompt", 16) != 16:  # a longer context is another workload (attention reads its keys)
        model += f".prompt{results['prompt']}"
    for w in results["workloads"]:
        base = f"device.{model}.{w['format'] or 'default'}.{w['variant']}.rows{w['rows']}"
        figures += [Figure.of(f"{base}.tok_s", [w["rows"] * 1000 / t for t in w["samples_ms"]], "tok/s", "higher"),
                    Figure.of(f"{base}.copy_fraction", [w["copy_fraction"]], "fraction", "higher"),
                    Figure.of(f"{base}.dispatches", [w["dispatches"]], "dispatches", "lower"),
                    Figure.of(f"{base}.gpu_ms", [w["gpu_ms"]], "ms", "lower")]
        if w.get("sm_mhz"):
            figures.append(Figure.of(f"{base}.sm_mhz", [w["sm_mhz"]], "MHz", "higher"))
    for label, hops in results["hops"].items():
        for rows, ms in hops.items():
            figures.append(Figure.of(f"device.{label.replace(' ', '.').replace('synthetic:', '')}.hop_ms.rows{rows}", [ms], "ms", "lower"))
    # the machine that measured: recorded there (a device machine's history stays there, so its
    # --json is appended here with --append-json)
    append_figures(figures, "bench_device", db=path or DEFAULT_DB, measured_on=recorded_machine(results.get("machine"), results["device"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="smollm2 or synthetic:llama-7b")
    ap.add_argument("--formats", default="", help="packed formats of a synthetic model's linears, e.g. s3g64,s4g64,s2g64")
    ap.add_argument("--variants", default=None,
                    help="matvec layouts side by side (see the docstring; default wgpu-blocks,wgpu; --profile: wgpu)")
    ap.add_argument("--rows", default="1,8,32,64", help="sessions decoding together, per workload")
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps per workload")
    ap.add_argument("--kernels", action="store_true", help="time each linear of a layer alone per layout first")
    ap.add_argument("--breakdown", action="store_true", help="GPU time of each kernel's dispatches in the first --rows workload")
    ap.add_argument("--json", default="", help="write every figure here too")
    ap.add_argument("--warm-up", type=float, default=3.0, help="seconds of GPU work before measuring")
    ap.add_argument("--history", default="", help="benchmark history database (default: the repository's; 'none': skip)")
    ap.add_argument("--append-json", default="", help="append a --json file of another machine's run to the history, then exit")
    ap.add_argument("--tokens", type=int, default=128, help="--backends mode: decode tokens")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens per session (default 16; --backends mode 256)")
    ap.add_argument("--backends", default="", help="the older comparison (e.g. wgpu,numpy) instead of the workloads")
    ap.add_argument("--check", action="store_true", help="compare wgpu with numpy first (SmolLM2 shape)")
    ap.add_argument("--profile", action="store_true", help="break a wgpu decode step down, then exit")
    a = ap.parse_args()
    if a.append_json:
        append_history(json.loads(Path(a.append_json).read_text()), a.history)
        return
    if not (a.backends or a.check or a.profile):
        a.prompt = 16 if a.prompt is None else a.prompt
        sys.exit(roofline(a))
    a.prompt = 256 if a.prompt is None else a.prompt
    t0 = time.perf_counter()
    weights = synthetic_model(SMOLLM2)
    print(f"synthetic SmolLM2-135M-shaped weights in {time.perf_counter() - t0:.1f}s", flush=True)
    if a.check and not check(weights):
        print("wgpu and numpy disagree", flush=True)
        sys.exit(1)
    if a.profile:
        fmt = (a.formats.split(",")[0] or None) if a.model != "smollm2" else None
        profile(weights if a.model == "smollm2" else model_weights(a.model, fmt), variant=(a.variants or "wgpu").split(",")[0])
        return
    rows = []
    for b in (a.backends or "wgpu,numpy").split(","):
        r = bench(b, weights, a.tokens, a.prompt)
        rows.append(r)
        print(f"{b:>6}: load {r['load_s']:.1f}s | prefill {r['prefill_tok_s']:.0f} tok/s ({a.prompt} tokens) | decode "
              f"{r['decode_tok_s']:.1f} tok/s (step p50 {r['decode_step_ms_p50']:.2f} ms) | 8 batched streams "
              f"{r['batch8_tok_s']:.0f} tok/s {r.get('adapter', '')}", flush=True)
        if "fused_decode_tok_s" in r:
            print(f"{b:>6}: fused forward_topk | prefill {r['fused_prefill_tok_s']:.0f} tok/s | decode "
                  f"{r['fused_decode_tok_s']:.1f} tok/s (step p10/p50/p90 {r['fused_step_ms_p10']:.2f}/"
                  f"{r['fused_step_ms_p50']:.2f}/{r['fused_step_ms_p90']:.2f} ms) | 8 batched streams "
                  f"{r['fused_batch8_tok_s']:.0f} tok/s", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

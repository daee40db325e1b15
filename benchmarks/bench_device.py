"""wgpu decode/prefill on a GPU machine, for a SmolLM2-135M-shaped model with synthetic weights
in the same formats (a4g32 linears, s8g32 tied embedding/head): the speed of a model depends on
its shapes and formats, not its values, and the real GGUF (100 MB) does not travel to the device
machine. Compares against the numpy backend on the same weights in the same run.

    python benchmarks/bench_device.py [--tokens 128] [--backends wgpu,numpy] [--check]

--backends also takes wgpu-fused and wgpu-unfused: the wgpu backend with its fused decode
kernels forced on or off (WgpuBackend(fuse_decode=...); the default fuses on a real GPU only),
e.g. --backends wgpu-fused,wgpu-unfused,wgpu-fused,wgpu-unfused for an A/B in one run.

"decode" is forward() then head_topk() per token (two submissions, two readbacks); "fused"
is forward_topk() where the backend has it (layers + head + top-k in one submission, one
readback of the k ids and logits). --check first compares wgpu with numpy on the same
weights (hidden states, top-k of prefill and decode, fused and not) and exits non-zero on a
mismatch.
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
from tab_worker.engine_types import HeadWeights, ModelConfig, ModelWeights, SessionSlice  # noqa: E402
from tab_worker.worker import synthetic_layer  # noqa: E402

SMOLLM2 = ModelConfig(n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536, vocab=49152,
                      rope_base=100000.0, rms_eps=1e-5, context=8192, eos_id=2, bos_id=1)


def synthetic_model(cfg: ModelConfig) -> ModelWeights:
    rng = np.random.default_rng(0)
    emb = quantize_rtn(rng.standard_normal((cfg.vocab, cfg.hidden), dtype=np.float32) * 0.05, QuantSpec(8, 32, True))
    layers = [synthetic_layer(cfg, seed=i) for i in range(cfg.n_layers)]
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


def profile(weights: ModelWeights, steps: int = 100) -> None:
    """Where a forward_topk decode step's time goes (wgpu): host-side phases, GPU-bound
    throughput (steps submitted back to back, one wait), and the wait strategies."""
    from kernels import runner as R
    from tab_worker import wgpu_backend as W

    cfg = weights.config
    be = W.WgpuBackend(cfg, dict(enumerate(weights.layers)), weights.head, 4096)
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


def kernel_breakdown(be, rows_plan: list, reps: int = 30) -> None:
    """GPU time of each kernel's share of a decode step: that kernel's dispatches alone, `reps`
    steps' worth submitted back to back, one wait (in-stream copies left out). The shares add
    up to more than a full step when dispatches overlap in the full one."""
    groups: dict[str, list] = {}
    for item in rows_plan:
        if item.__class__ is tuple:
            groups.setdefault(item[5].label or "?", []).append(item)

    def gpu_ms(plan):
        be.dev.execute(plan)
        be.dev.device._poll_wait()
        t0 = time.perf_counter()
        for _ in range(reps):
            be.dev.execute(plan)
        be.dev.device._poll_wait()
        return (time.perf_counter() - t0) * 1000 / reps

    empty = gpu_ms([])
    full = gpu_ms([i for i in rows_plan if i.__class__ is tuple])
    print(f"profile: kernels: full step {full:.3f} ms GPU-bound, empty submit {empty:.3f} ms", flush=True)
    for label, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        t = gpu_ms(items)
        print(f"profile: kernel {label:40s} x{len(items):3d}  {t:.3f} ms/step  {1000 * (t - empty) / len(items):.1f} us each", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--backends", default="wgpu,numpy")
    ap.add_argument("--check", action="store_true", help="compare wgpu with numpy first")
    ap.add_argument("--profile", action="store_true", help="break a wgpu decode step down, then exit")
    a = ap.parse_args()
    t0 = time.perf_counter()
    weights = synthetic_model(SMOLLM2)
    print(f"synthetic SmolLM2-135M-shaped weights in {time.perf_counter() - t0:.1f}s", flush=True)
    if a.check and not check(weights):
        print("wgpu and numpy disagree", flush=True)
        sys.exit(1)
    if a.profile:
        profile(weights)
        return
    rows = []
    for b in a.backends.split(","):
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

"""How far int8 activations per 32-block (llama.cpp's Q8 dot-product inputs) would move SmolLM2's
logits from Hugging Face's golden ones (tests/fixtures), against the f32 activations the packed
kernel uses: the measurement behind that choice (kernels/c/packed_kernels.c's header).

    .venv/bin/python benchmarks/bench_q8_activations.py

Every matmul's input rows are rounded to int8 with one scale per 32-block (round-to-nearest,
scale = max|x| / 127, as llama.cpp quantizes activations to Q8), then multiplied exactly;
teacher-forced over every golden case, top-5 logits compared with HF's.
"""
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tab_worker import cpu_kernels  # noqa: E402
from protocol.model_types import SessionSlice  # noqa: E402
from model.embedding import embed  # noqa: E402
from tab_worker.generate import LocalGenerator  # noqa: E402
from model.loader import GGUFModel  # noqa: E402

GOLDEN = json.loads((ROOT / "tests" / "fixtures" / "smollm2_golden.json").read_text())
orig = cpu_kernels.PackedMatrix.apply


def q8(x):
    """x rounded to int8 per 32-block (one f32 scale each), as f32 again."""
    x = np.asarray(x, np.float32)
    m, k = x.shape
    kp = -(-k // 32) * 32
    xp = np.zeros((m, kp), np.float32)
    xp[:, :k] = x
    b = xp.reshape(m, -1, 32)
    d = np.abs(b).max(-1, keepdims=True) / 127
    d[d == 0] = 1
    return (np.rint(b / d) * d).reshape(m, kp)[:, :k].astype(np.float32)


w = GGUFModel().load_all()
gen = LocalGenerator(w, backend="numpy", max_ctx=512)
for mode in ("f32", "q8"):
    cpu_kernels.PackedMatrix.apply = orig if mode == "f32" else (lambda self, x, out=None: orig(self, q8(x), out))
    worst, argmax_diff, n = 0.0, 0, 0
    for case in GOLDEN["cases"]:
        ids = case["prompt_ids"] + case["greedy_ids"]
        be = gen.backend
        h = be.forward([SessionSlice("g", 0, len(ids))], embed(w.embedding, ids))
        rows = h[len(case["prompt_ids"]) - 1: len(case["prompt_ids"]) - 1 + len(case["greedy_ids"])]
        top_ids, top_logits = be.head_topk(rows, 5)
        be.drop_session("g")
        for i, step in enumerate(case["steps"]):
            exp = dict(zip(step["top5_ids"], step["top5_logits"]))
            n += 1
            argmax_diff += int(top_ids[i][0] != step["top5_ids"][0])
            for t, v in zip(top_ids[i], top_logits[i]):
                if t in exp:
                    worst = max(worst, abs(float(v) - exp[t]))
    print(f"{mode}: max |logit - HF| over top-5 = {worst:.4f} (test tolerance 2e-3); argmax differs at {argmax_diff} of {n} teacher-forced steps")

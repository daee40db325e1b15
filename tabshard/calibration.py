"""Calibration and evaluation for quantization: a numpy forward over whole windows that can tap
the inputs of every linear layer, the Hessians X^T X GPTQ needs, perplexity and greedy agreement.

Texts: tabshard/calibration_text.py builds them (issue 22): calibration from a mix of domains
(Python docs, stdlib docstrings, changelogs), mixed precision scored on a slice of those
domains held out from the Hessians, and evaluation on other domains (licenses, man pages,
READMEs) whose text never reaches calibration, reported per domain.

Perplexity is exp(mean negative log-likelihood) of every token of a window given the window's
tokens before it (the first token of each window is context only).

Quantization pipeline (``Calibrator``): one pass of the source model over the calibration
tokens collects X^T X at each linear layer's input (GPTQ's Hessian; its diagonal is the
importance matrix); every (tensor, method, format) is then quantized independently and cached,
so any mixed plan is assembled without re-running anything. ``assemble(plan, sequential=True)``
re-runs GPTQ for the chosen plan layer after layer on the quantized layers' outputs.
``Calibrator(rotation=seed)`` does all of it in a rotated residual basis (tabshard/rotation.py);
``ffn_rotation=seed`` also rotates each FFN's hidden space (a Walsh-Hadamard transform the
runtime applies before ffn_down: rotation.rotate_ffn), alone or with the residual rotation.

Sensitivity and mixed precision: a tensor's cost is estimated as alpha * proxy, where the proxy
is its relative output error, tr(dW H dW^T) / tr(W H W^T), on the activations of calibration-
domain text held out from the Hessians (``score_on``; GPTQ fits its own tokens), and alpha
(per tensor type and probe format) converts proxy into measured loss: quantize ONE type in
every layer at the probe, keep the rest source, measure the increase in NLL per token on
held-out calibration-domain text, divide by the type's summed proxies (``Costs``). Measured
probes: 2-bit (s2g32) and 3-bit (s3g64) GPTQ for the linears, s4g32 for the embedding — 15
short forwards. ``tabshard/mixed_precision.py`` turns them into costs and
``tabshard/precision.py`` picks the formats (a multiple-choice knapsack). The report prints
each mixed plan's predicted delta NLL beside its measured
perplexity: the validation.

The forward, the Hessians and the tensors' names live in tabshard/dense_model.py.
"""
from __future__ import annotations

import numpy as np

from kernels.quant import dequantize
from protocol.model_types import LayerWeights, ModelWeights
from tabshard import sequential_gptq
from tabshard.dense_model import (EMBEDDING, HEAD, LINEAR_TYPES, SOURCE, TAP_OF, TAPS, TYPE_OF, WINDOW, DenseLayer,
                                  DenseModel, hessians, parse_choice, tensor_names, windows)
from tabshard.rotation import rotate_dense, rotate_ffn


def limit_blas_threads(n: int) -> bool:
    """Cap numpy's OpenBLAS threads at n (it busy-waits: on a shared machine one thread can be
    4x faster than two). True if the cap was applied."""
    import ctypes
    import glob
    import os

    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*"))
    for lib in libs:
        try:
            dll = ctypes.CDLL(lib)
        except OSError:
            continue
        for sym in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            f = getattr(dll, sym, None)
            if f is not None:
                f(ctypes.c_int(n))
                return True
    return False


# ------------------------------------------------------------------ the quantization pipeline

ROTATED_SOURCE = "rtn:s8g32"  # a rotated model has no packed source: 8-bit is its lossless stand-in


class Calibrator:
    """Source weights, calibration Hessians, and every (tensor, method, format) quantized once.

    Hessians come from the source model's activations on the calibration text, so each tensor
    is quantized independently of the others: any mixed plan is assembled from the cache.
    ``assemble(plan, sequential=True)`` instead runs GPTQ layer by layer, each layer's Hessians
    from the outputs of the already-quantized layers before it (``sequential``).

    ``rotation`` (a seed) works in a rotated residual basis (tabshard/rotation.py): norms folded
    and set to one, the head untied (tensor ``output``, quantized like the embedding unless the
    plan names it). Its ``source`` is ``ROTATED_SOURCE``: no packed source exists there.
    ``ffn_rotation`` (a seed) rotates each FFN's hidden space (rotation.rotate_ffn): ffn_up and
    ffn_down change, so their ``source`` is ``ROTATED_SOURCE`` too; the config the assembled
    weights carry says ffn_hadamard, which every runtime applies."""

    def __init__(self, weights: ModelWeights, calib_ids, window: int = WINDOW, cache_dir: str | None = None,
                 rotation: int | None = None, damp: float | None = None, act_order: bool = True,
                 ffn_rotation: int | None = None):
        from kernels.quantizers import GPTQHessian

        self.source = weights
        self.config = weights.config
        self.rotation = rotation
        # None: GPTQ's damping by code width (kernels/quantizers.DAMP_BY_BITS)
        self.damp, self.act_order = damp, act_order
        self.window = window
        self.ffn_rotation = ffn_rotation
        self.dense = DenseModel(weights)
        if rotation is not None:
            self.dense = rotate_dense(self.dense, rotation)
        if ffn_rotation is not None:
            self.dense = rotate_ffn(self.dense, ffn_rotation)
        self.config = self.dense.config  # ffn_hadamard set when the FFNs are rotated
        self.calib_ids = list(calib_ids)
        self._prepared: dict = {}
        self._GPTQHessian = GPTQHessian
        self._cache: dict = {}
        self._sequential: dict = {}
        self._scoring = None  # (per-layer, head) Hessians the proxy is measured on (score_on)
        self.seconds: dict = {}  # choice -> quantization seconds spent (summed over tensors)
        self.cache_dir = None
        if cache_dir:
            import hashlib
            import os

            from kernels import quantizers as Q

            key = hashlib.sha256(np.asarray(self.calib_ids, np.int64).tobytes())
            for lw in weights.layers[:2]:
                key.update(lw.wq.qweight.tobytes())
            key.update(repr((rotation, window)).encode())
            # the Hessians depend on the text, model and basis; the quantized tensors also on
            # the quantizers' settings, so those live one folder down
            settings = "q-" + hashlib.sha256(repr((damp, Q.DAMP, sorted(Q.DAMP_BY_BITS.items()), act_order,
                                                   Q.VERSION)).encode()).hexdigest()[:12]
            self.hessian_dir = os.path.join(cache_dir, key.hexdigest()[:16])
            # the FFN rotation changes ffn_up and ffn_down (and ffn_down's Hessian) only: every
            # other tensor is the same as in the basis without it, and is shared with it on disk
            self.shared_cache_dir = os.path.join(self.hessian_dir, settings)
            if ffn_rotation is not None:
                self.hessian_dir += f"-ffn{ffn_rotation}-{self.config.ffn_hadamard}"
            self.cache_dir = os.path.join(self.hessian_dir, settings)
            os.makedirs(self.cache_dir, exist_ok=True)
            os.makedirs(self.shared_cache_dir, exist_ok=True)
        self.hessians, self.head_hessian = self._hessians()

    def _hessians(self):
        """The calibration Hessians, from the disk cache when one is given (one forward over
        the calibration text: minutes on a loaded 2-core host)."""
        import os

        p = os.path.join(self.hessian_dir, "hessians.npz") if self.cache_dir else None
        if p and os.path.exists(p):
            with np.load(p) as z:
                per_layer = [{t: z[f"{i}|{t}"] for t in TAPS} for i in range(self.config.n_layers)]
                return per_layer, z["head"]
        per_layer, head = hessians(self.dense, self.calib_ids, self.window)
        if p:
            arrays = {f"{i}|{t}": h[t] for i, h in enumerate(per_layer) for t in TAPS}
            np.savez(f"{p}.{os.getpid()}.part.npz", head=head, **arrays)
            os.replace(f"{p}.{os.getpid()}.part.npz", p)
        return per_layer, head

    @property
    def rotated(self) -> bool:
        return self.rotation is not None

    def ffn_rotated(self, name: str) -> bool:
        """Whether a tensor's source changed under the FFN rotation (ffn_up, ffn_down)."""
        return self.ffn_rotation is not None and name.endswith((".ffn_up", ".ffn_down"))

    def tensor_names(self) -> list[str]:
        return tensor_names(self.config.n_layers) + ([HEAD] if self.rotated else [])

    def _choice(self, plan: dict, name: str) -> str:
        """The plan's choice for a tensor: the rotated head follows the embedding unless named;
        'source' in a rotated basis is its 8-bit stand-in."""
        c = plan.get(name, plan.get(EMBEDDING, SOURCE) if name == HEAD else SOURCE)
        return ROTATED_SOURCE if (c == SOURCE and (self.rotated or self.ffn_rotated(name))) else c

    def source_tensor(self, name: str):
        if self.rotated or self.ffn_rotated(name):
            return self.quantized(name, ROTATED_SOURCE)
        if name == EMBEDDING:
            return self.source.embedding
        _, i, t = name.split(".")
        attr = {v: k for k, v in TYPE_OF.items()}[t]
        return getattr(self.source.layers[int(i)], attr)

    def source_dense(self, name: str) -> np.ndarray:
        if name == EMBEDDING:
            return self.dense.embedding
        if name == HEAD:
            return self.dense.head
        _, i, t = name.split(".")
        attr = {v: k for k, v in TYPE_OF.items()}[t]
        return self.dense.layers[int(i)].mats[attr]

    def hessian(self, name: str) -> np.ndarray:
        if name in (EMBEDDING, HEAD):
            return self.head_hessian
        _, i, t = name.split(".")
        attr = {v: k for k, v in TYPE_OF.items()}[t]
        return self.hessians[int(i)][TAP_OF[attr]]

    def prepare(self, h: np.ndarray, bits: int):
        """GPTQ's view of Hessian ``h`` for codes of ``bits``: damped as measured for that width."""
        from kernels.quantizers import damping

        return self._GPTQHessian.of(h, damping(bits) if self.damp is None else self.damp, self.act_order)

    def _prepared_hessian(self, name: str, bits: int):
        if name in (EMBEDDING, HEAD):
            key = (EMBEDDING, bits)
        else:
            _, i, t = name.split(".")
            key = (int(i), TAP_OF[{v: k for k, v in TYPE_OF.items()}[t]], bits)
        if key not in self._prepared:
            self._prepared[key] = self.prepare(self.hessian(name), bits)
        return self._prepared[key]

    def embedding_importance(self) -> np.ndarray:
        """The tied embedding is both a lookup table (every column counts alike) and the LM
        head (columns count by the head input's energy): weight both, normalised. Untied (a
        rotated model), the lookup table alone: every column alike."""
        if self.rotated:
            return np.ones(self.config.hidden, np.float32)
        d = np.diag(self.head_hessian)
        return (d / max(d.mean(), 1e-30) + 1.0).astype(np.float32)

    def _quantize(self, name: str, choice: str, w: np.ndarray, hessian=None):
        """One tensor under one 'method:spec' choice; ``hessian`` (GPTQHessian) overrides the
        calibration one (sequential GPTQ)."""
        from kernels import quantizers as Q

        method, spec = parse_choice(choice)
        if name == EMBEDDING:
            # a lookup table too, so no GPTQ (it would trade lookups for logits): weighted clip
            return Q.quantize_rtn(w, spec) if method == "rtn" else Q.quantize_clip(w, spec, self.embedding_importance())
        if name == HEAD and method == "gptq":
            method = "clip"  # the head's 49k rows: importance-weighted clip, GPTQ's gain is small there
        # a finer source's block grids as scale candidates (Q4_1 blocks inside an a4g64 group)
        grid = [] if self.rotated or name == HEAD or self.ffn_rotated(name) else Q.source_grid(self.source_tensor(name), spec)
        if method == "gptq":
            return Q.gptq_refined(w, hessian if hessian is not None else self._prepared_hessian(name, spec.bits), spec, extra=grid)
        if method == "clip":  # importance-weighted (diag of the Hessian)
            h = self.hessian(name) if hessian is None else None
            imp = np.diag(h) if h is not None else hessian.importance
            return Q.quantize_clip(w, spec, imp, extra=grid)
        return Q.quantize(w, spec, method)

    def quantize_many(self, pairs, workers: int) -> None:
        """Quantize every (tensor, choice) of ``pairs`` not yet cached, in ``workers`` forked
        processes that write the disk cache (each tensor is independent of the others); this
        process then reads them back. Needs a cache folder; with none, or one worker, nothing
        happens here and ``quantized`` computes each when asked."""
        import multiprocessing as mp

        todo = sorted({(n, c) for n, c in pairs if c != SOURCE and (n, c) not in self._cache
                       and self._disk_load(n, c, parse_choice(c)[1]) is None})
        if not todo or workers <= 1 or not self.cache_dir:
            return
        # the biggest first, so the pool does not end waiting on one long GPTQ
        todo.sort(key=lambda nc: -self.source_dense(nc[0]).size)
        global _POOL_CALIBRATOR
        _POOL_CALIBRATOR = self  # forked workers inherit it: only (tensor, choice) names travel
        try:
            with mp.get_context("fork").Pool(workers) as pool:
                for name, choice, spent in pool.imap_unordered(_quantize_in_worker, todo):
                    self.seconds[choice] = self.seconds.get(choice, 0.0) + spent
        finally:
            _POOL_CALIBRATOR = None

    def quantized(self, name: str, choice: str):
        """The tensor under one choice ('source' or 'method:spec'), cached."""
        import time

        if choice == SOURCE:
            return self.source_tensor(name)
        key = (name, choice)
        if key not in self._cache:
            _, spec = parse_choice(choice)
            cached = self._disk_load(name, choice, spec)
            if cached is not None:
                self._cache[key] = cached[0]
                self.seconds[choice] = self.seconds.get(choice, 0.0) + cached[1]
                return cached[0]
            t0 = time.perf_counter()
            t = self._quantize(name, choice, self.source_dense(name))
            spent = time.perf_counter() - t0
            self.seconds[choice] = self.seconds.get(choice, 0.0) + spent
            self._cache[key] = t
            self._disk_save(name, choice, t, spent)
        return self._cache[key]

    def _disk_path(self, name: str, choice: str):
        import os

        if not self.cache_dir:
            return None
        folder = self.cache_dir if self.ffn_rotation is None or self.ffn_rotated(name) else self.shared_cache_dir
        return os.path.join(folder, f"{name}__{choice.replace(':', '_')}.npz")

    def _disk_load(self, name, choice, spec):
        from kernels.quant import QuantTensor

        p = self._disk_path(name, choice)
        if not p:
            return None
        try:
            with np.load(p) as z:
                return QuantTensor(spec, int(z["n"]), int(z["k"]), z["q"], z["s"]), float(z["sec"])
        except (OSError, KeyError, ValueError):
            return None

    def _disk_save(self, name, choice, t, spent):
        import os

        p = self._disk_path(name, choice)
        if p:
            np.savez(f"{p}.{os.getpid()}.part.npz", n=t.n, k=t.k, q=t.qweight, s=t.scales, sec=spent)
            os.replace(f"{p}.{os.getpid()}.part.npz", p)

    def score_on(self, ids) -> None:
        """Measure ``proxy`` on the activations of ``ids`` (text held out from the Hessians)
        instead of the calibration text's. GPTQ fits its own calibration tokens: there a 3-bit
        tensor's error looks far smaller, next to a 4-bit one's, than on any other text, and a
        plan scored so buys 3 bits where they cost most elsewhere."""
        per_layer, head = hessians(self.dense, ids, self.window)
        self._scoring = (per_layer, head)
        self._cache = {k: v for k, v in self._cache.items() if k[0] != "proxy"}

    def proxy(self, name: str, choice: str) -> float:
        """Cheap cost of one tensor's quantization: its relative output error on the scoring
        activations (``score_on``; by default the calibration text's), tr(dW H dW^T) / tr(W H W^T)."""
        from kernels.quantizers import output_error

        if choice == SOURCE and not self.rotated:
            return 0.0
        key = ("proxy", name, choice)
        if key not in self._cache:
            w = self.source_dense(name)
            t = self.quantized(name, choice)
            self._cache[key] = output_error(w, t, self._scoring_hessian(name))
        return self._cache[key]

    def _scoring_hessian(self, name: str) -> np.ndarray:
        scoring = self._scoring
        if scoring is None:
            return self.hessian(name)
        if name in (EMBEDDING, HEAD):
            return scoring[1]
        _, i, t = name.split(".")
        return scoring[0][int(i)][TAP_OF[{v: k for k, v in TYPE_OF.items()}[t]]]

    # ---------------------------------------------------------------- sequential GPTQ

    def sequential(self, plan: dict) -> dict:
        """{tensor: QuantTensor} for the plan with GPTQ run layer after layer on the quantized
        layers' outputs (tabshard/sequential_gptq.py), cached per plan in memory and on disk."""
        key = self.plan_key(plan)
        if key not in self._sequential:
            path = None if not self.cache_dir else f"{self.cache_dir}/sequential_{key}.npz"
            out, sec = sequential_gptq.load(path) if path else (None, 0.0)
            if out is None:
                out, sec = sequential_gptq.run(self, plan)
                if path:
                    sequential_gptq.save(path, out, sec)
            self.seconds[f"sequential:{key}"] = sec
            self._sequential[key] = out
        return self._sequential[key]

    def plan_key(self, plan: dict) -> str:
        import hashlib
        import json

        return hashlib.sha256(json.dumps(sorted((n, self._choice(plan, n)) for n in self.tensor_names())).encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- plans to models

    def assemble(self, plan: dict, sequential: bool = False) -> ModelWeights:
        """ModelWeights with each tensor as the plan says (missing names stay source)."""
        from dataclasses import replace

        seq = self.sequential(plan) if sequential else None

        def get(name):
            return seq[name] if seq is not None else self.quantized(name, self._choice(plan, name))

        layers = []
        for i, lw in enumerate(self.source.layers):
            kw = {attr: get(f"blk.{i}.{t}") for attr, t in TYPE_OF.items()}
            if self.rotated:
                kw.update(attn_norm=self.dense.layers[i].attn_norm, ffn_norm=self.dense.layers[i].ffn_norm)
            layers.append(replace(lw, **kw))
        emb = get(EMBEDDING)
        head = self.source.head
        if self.rotated:
            head = replace(head, output=get(HEAD), output_norm=self.dense.head_norm)
        else:
            tied = head.output is self.source.embedding
            head = replace(head, output=emb if tied else head.output)
        return ModelWeights(config=self.config, embedding=emb, layers=layers, head=head)

    def dense_of(self, plan: dict, sequential: bool = False) -> DenseModel:
        """A DenseModel of the plan, reusing the source's f32 matrices where unchanged."""
        w = self.assemble(plan, sequential)
        keep = not self.rotated  # a rotated model's 'source' is 8-bit: dequantize it too
        layers = []
        for i, (lw, src) in enumerate(zip(w.layers, self.dense.layers)):
            mats = {attr: (src.mats[attr] if keep and plan.get(f"blk.{i}.{t}", SOURCE) == SOURCE
                           and not self.ffn_rotated(f"blk.{i}.{t}") else dequantize(getattr(lw, attr)))
                    for attr, t in TYPE_OF.items()}
            layers.append(DenseLayer(src.attn_norm, src.ffn_norm, mats))
        emb = self.dense.embedding if keep and plan.get(EMBEDDING, SOURCE) == SOURCE else dequantize(w.embedding)
        if self.rotated:
            head = dequantize(w.head.output)
        else:
            head = emb if w.head.output is w.embedding else self.dense.head
        d = DenseModel(w, layers=layers, embedding=emb, head=head)
        d.head_norm = self.dense.head_norm
        return d

    def sensitivity(self, probe: str, ids, types=LINEAR_TYPES + (EMBEDDING,), embedding_probe: str = "clip:s4g32") -> dict:
        """Measured cost per tensor type: the increase in mean NLL per token on ``ids`` (text
        held out from the Hessians) when that type alone is quantized with ``probe`` and
        everything else is source. Returns {type: (delta_nll, sum of the type's proxies under
        the probe)}."""
        base, count = (self.dense_of({}) if self.rotated or self.ffn_rotation is not None else self.dense).nll(windows(ids))
        out = {}
        for t in types:
            choice = embedding_probe if t == EMBEDDING else probe
            names = [EMBEDDING] if t == EMBEDDING else [f"blk.{i}.{t}" for i in range(self.config.n_layers)]
            plan = {n: choice for n in names}
            if t == EMBEDDING and self.rotated:
                plan[HEAD] = ROTATED_SOURCE
            total, _ = self.dense_of(plan).nll(windows(ids))
            out[t] = ((total - base) / count, sum(self.proxy(n, choice) for n in names))
        return out


_POOL_CALIBRATOR = None


def _quantize_in_worker(job):
    """One (tensor, choice) quantized in a pool worker; the disk cache carries the result."""
    import time

    name, choice = job
    cal = _POOL_CALIBRATOR
    limit_blas_threads(1)
    t0 = time.perf_counter()
    t = cal._quantize(name, choice, cal.source_dense(name))
    spent = time.perf_counter() - t0
    cal._disk_save(name, choice, t, spent)
    return name, choice, spent


def model_bytes(w: ModelWeights) -> int:
    """The whole model as packed: every matrix (the tied head counted once) and norm vector."""
    total = w.embedding.nbytes + sum(lw.nbytes for lw in w.layers) + w.head.output_norm.nbytes
    if w.head.output is not w.embedding:
        total += w.head.output.nbytes
    return total


def linear_bits_per_weight(w: ModelWeights) -> float:
    """Effective bits per weight of the transformer layers' matrices, scales/mins and group
    padding included (the table in issue 7)."""
    nbytes = sum(getattr(lw, m).nbytes for lw in w.layers for m in LayerWeights.MATRICES)
    count = sum(getattr(lw, m).n * getattr(lw, m).k for lw in w.layers for m in LayerWeights.MATRICES)
    return 8.0 * nbytes / count

"""A lean numpy backend: keeps the packed weights and dequantizes one matrix at a time per step.

NumpyBackend holds every matrix as f32 (~8x the packed bytes); a tab capped at 1 GiB of weights
(the 7B-in-tabs setup) cannot afford that. This backend holds the packed QuantTensors (~1x) and
builds each f32 matrix, in the same layout NumpyBackend uses, just before its matmul: the
numbers are identical to NumpyBackend's (tests/test_simulation_lean.py), the step is slower.
"""
from __future__ import annotations

import numpy as np

from kernels.quant import dequantize
from tab_worker.engine_types import LayerWeights
from tab_worker.numpy_backend import NumpyBackend

EXPANSION = 1.1  # packed bytes + one layer's transient f32 matrices, per packed byte held (approx.)


class _LeanLayer:
    def __init__(self, w: LayerWeights):
        self.w = w
        self.attn_norm = np.asarray(w.attn_norm, np.float32)
        self.ffn_norm = np.asarray(w.ffn_norm, np.float32)

    @property
    def w_qkv_t(self):
        w = self.w
        return np.ascontiguousarray(np.concatenate([dequantize(w.wq), dequantize(w.wk), dequantize(w.wv)]).T)

    @property
    def wo_t(self):
        return np.ascontiguousarray(dequantize(self.w.wo).T)

    @property
    def w_gate_up_t(self):
        return np.ascontiguousarray(np.concatenate([dequantize(self.w.w_gate), dequantize(self.w.w_up)]).T)

    @property
    def w_down_t(self):
        return np.ascontiguousarray(dequantize(self.w.w_down).T)


class LeanNumpyBackend(NumpyBackend):
    name = "numpy-lean"

    def __init__(self, config, layers, head, max_ctx, **_device_options):
        # build with no layers (nothing dense), then hold the packed ones
        super().__init__(config, {}, head, max_ctx)
        self.layer_ids = sorted(layers)
        if self.layer_ids and self.layer_ids != list(range(self.layer_ids[0], self.layer_ids[-1] + 1)):
            raise ValueError(f"layers must be a contiguous range, got {self.layer_ids}")
        self._layers = [_LeanLayer(layers[i]) for i in self.layer_ids]

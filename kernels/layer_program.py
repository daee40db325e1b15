"""The layer program: the dispatches of a transformer layer and of the head's norm + matvec,
described once, as data, and executed by both the native backend (tab_worker/wgpu_backend.py)
and the browser's (tab_worker/web/backend_webgpu.js, which fetches it as
/kernels/layer_program.json). A new fused kernel or a new op order written here reaches the
browser tab by construction; the two backends keep only how to launch a kernel and a packed
matvec (runner.Launch / QuantLinear and their JS twins).

A program is a list of ops, each one of:

* ``{"op": "kernel", "kernel": K, "wg": W, "constants": {...}, "buffers": [...], "params": {...},
  "grid": [x, y]}``: kernels/K.wgsl with the override WG = the device's workgroup size for W
  (W an int, or {"gpu": .., "cpu": ..} by adapter kind), the other overrides and its Params
  fields as expressions, its storage buffers by name, and a grid of (x, y) workgroups;
* ``{"op": "linear", "weight": W, "x": X, "y": Y, "accumulate": bool, "norm": N?,
  "silu_up_col": expr?}``: y[:, col:] (+)= x @ W.T for each part of weight W (q/k/v or
  gate/up are one matrix when their formats agree, else parts at column offsets), with the RMS
  norm of weight N, or silu(gate) * up, folded into its input;
* ``{"op": "by_rows", "fusable": expr?, "fused": [...], "plain": [...]}``: the fused ops for a
  decode batch of up to the backend's fuse limit rows (where it fuses, and where ``fusable``
  is nonzero), else the plain ones;
* ``{"op": "when", "if": expr, "then": [...], "else": [...]}``: the ``then`` ops where ``if``
  is nonzero for this model, else the ``else`` ops (chosen once, when the ops are built).

Expressions are strings (or numbers) over the names in ``names()``: integers and floats,
+ - * / // %, ==, unary -, and cdiv(a, b), min, max, sqrt. Strides of the scratch buffers
(``stride_h``...) are their widths rounded up to 4 floats. Both sides evaluate them with the
same small grammar (``evaluate`` here, ``evaluate`` in backend_webgpu.js).
"""
from __future__ import annotations

import ast
import json
import math

# scratch activations: name -> floats per row (the stride is this rounded up to 4)
SCRATCH = {"h": "hidden", "xn": "hidden", "qkv": "q_dim + 2 * kv_dim", "attn": "q_dim", "gate_up": "2 * ffn", "act": "ffn"}


def _kernel(kernel: str, wg, buffers: list, params: dict, grid: list, **constants) -> dict:
    return {"op": "kernel", "kernel": kernel, "wg": wg, "constants": constants, "buffers": buffers, "params": params,
            "grid": grid}


def _linear(weight: str, x: str, y: str, accumulate: bool = False, **prologue) -> dict:
    return {"op": "linear", "weight": weight, "x": x, "y": y, "accumulate": accumulate, **prologue}


def _rmsnorm(src: str, weight: str) -> dict:
    return _kernel("rmsnorm", 256, [src, weight, "xn"],
                   {"n": "hidden", "x_stride": f"stride_{src}", "y_stride": "stride_xn", "eps": "rms_eps"}, ["rows", 1])


def _layer() -> list:
    rope = _kernel("rope", 64, ["qkv", "positions", "freq_turns"],
                   {"n_heads": "n_heads + n_kv_heads", "head_dim": "head_dim", "x_stride": "stride_qkv", "x_col": 0},
                   ["cdiv((n_heads + n_kv_heads) * head_dim // 2, wg)", "rows"])
    kv_store = _kernel("kv_store", 64, ["qkv", "positions", "slots", "k_pool", "v_pool"],
                       {"n_kv": "n_kv_heads", "head_dim": "head_dim", "ctx": "pool_ctx", "src_stride": "stride_qkv",
                        "k_col": "q_dim", "v_col": "q_dim + kv_dim"}, ["cdiv(kv_dim, wg)", "rows"])
    # keys scored per chunk: a GPU wants many threads (one walk of the first 1024 positions); a
    # CPU rasteriser pays for every invocation, and short contexts leave a wide workgroup idle.
    # kv_splits > 1 (split-K, see KV_SPLITS): each row's keys in kv_splits runs walked by their
    # own workgroups (the grid's z), their partials in attn_parts folded by attention_combine,
    # which dispatches nothing (no rows) when there is one run
    attention_wg = {"gpu": 1024, "cpu": "max(64, head_dim)"}
    attention_params = {"n_heads": "n_heads", "n_kv": "n_kv_heads", "ctx": "pool_ctx", "q_stride": "stride_qkv",
                        "q_col": 0, "out_stride": "stride_attn", "scale": "1 / sqrt(head_dim)", "splits": "kv_splits"}
    attention = _kernel("attention", attention_wg, ["qkv", "positions", "slots", "k_pool", "v_pool", "attn", "attn_parts"],
                        attention_params, ["n_heads", "rows", "kv_splits"], HEAD_DIM="head_dim")
    # decode batches: rope + the KV store folded into attention, one dispatch fewer a layer
    # (attention_rope.wgsl: every workgroup stores the keys and values it reads itself)
    attention_rope = _kernel("attention_rope", attention_wg,
                             ["qkv", "positions", "slots", "freq_turns", "k_pool", "v_pool", "attn", "attn_parts"],
                             {**attention_params, "k_col": "q_dim", "v_col": "q_dim + kv_dim"},
                             ["n_heads", "rows", "kv_splits"], HEAD_DIM="head_dim")
    attention_combine = _kernel("attention_combine", "head_dim // 4", ["attn_parts", "attn"],
                                {"n_heads": "n_heads", "splits": "kv_splits", "out_stride": "stride_attn"},
                                ["n_heads", "rows * min(1, kv_splits - 1)"], HEAD_DIM="head_dim")
    silu = _kernel("silu_gate", 64, ["gate_up", "act"],
                   {"n": "ffn", "src_stride": "stride_gate_up", "gate_col": 0, "up_col": "ffn", "y_stride": "stride_act"},
                   ["cdiv(ffn, wg)", "rows"])
    # a CPU rasteriser pays most for barriers: 16 threads own 32 of a 512 block each, and the
    # transform needs one barrier (kernels/silu_hadamard.wgsl); a GPU wants more threads
    silu_hadamard = _kernel("silu_hadamard", {"gpu": 64, "cpu": 16}, ["gate_up", "act"],
                            {"src_stride": "stride_gate_up", "gate_col": 0, "up_col": "ffn", "y_stride": "stride_act",
                             "scale": "1 / sqrt(ffn_hadamard)"},
                            ["ffn // ffn_hadamard", "rows"], BLOCK="ffn_hadamard")
    return [
        {"op": "by_rows", "fused": [_linear("qkv", "h", "qkv", norm="attn_norm")],
         "plain": [_rmsnorm("h", "attn_norm"), _linear("qkv", "xn", "qkv")]},
        {"op": "by_rows", "fused": [attention_rope], "plain": [rope, kv_store, attention]},
        attention_combine,
        _linear("wo", "attn", "h", accumulate=True),
        {"op": "by_rows", "fused": [_linear("gate_up", "h", "gate_up", norm="ffn_norm")],
         "plain": [_rmsnorm("h", "ffn_norm"), _linear("gate_up", "xn", "gate_up")]},
        # a rotated FFN hidden space (tabshard/rotation.py): ffn_down reads the Walsh-Hadamard
        # transform of the activation, fused with the SiLU gate that writes it
        {"op": "when", "if": "ffn_hadamard",
         "then": [silu_hadamard, _linear("w_down", "act", "h", accumulate=True)],
         # qmatvec_silu reads the up half as vec4
         "else": [{"op": "by_rows", "fusable": "ffn % 4 == 0",
                   "fused": [_linear("w_down", "gate_up", "h", accumulate=True, silu_up_col="ffn")],
                   "plain": [silu, _linear("w_down", "act", "h", accumulate=True)]}]},
    ]


def _head() -> list:
    """The final norm and the output matvec, reading rows of scratch buffer ``src`` (the
    backend binds it: the residual stream, or the gathered last rows of each session)."""
    return [{"op": "by_rows", "fused": [_linear("output", "src", "logits", norm="output_norm")],
             "plain": [_rmsnorm("src", "output_norm"), _linear("output", "xn", "logits")]}]


# split-K attention's key runs per row (the name kv_splits): on a GPU one per 64 Ki floats of a
# KV head's keys in the pools (pool_ctx positions of head_dim: pool_ctx, a power of two, grows
# with the longest session), so a long context is walked by many workgroups and a short one keeps
# one dispatch; with 128-float heads (LLaMA-7B's) from 1024 positions, with 64-float ones
# (SmolLM2's) from 2048: a workgroup's parts each walk keys * head_dim / (4 WG) keys, and a run
# is worth its fold's dispatch once that walk is long (H200, bench_device -kvN variants at
# 200 and 900 prompt tokens). On a CPU rasteriser, where every workgroup costs, one. A backend
# may take fewer (its partials must fit a binding).
KV_SPLITS = {"gpu": "max(1, min(64, pool_ctx * head_dim // 65536))", "cpu": 1}

PROGRAM = {"version": 1, "scratch": SCRATCH, "kv_splits": KV_SPLITS, "layer": _layer(), "head": _head()}


def program_json() -> str:
    """What the coordinator serves as /kernels/layer_program.json."""
    return json.dumps(PROGRAM, indent=1)


def names(config, pool_ctx: int, rows: int, real_gpu: bool = False, kv_splits: int | None = None) -> dict:
    """The names expressions may use: the model config's fields, q_dim / kv_dim, the scratch
    strides, the KV pools' positions per slot, the batch rows, and kv_splits (KV_SPLITS for
    this adapter kind, unless given)."""
    c = config if isinstance(config, dict) else config.to_dict()
    env = {k: v for k, v in c.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    env["q_dim"] = env["n_heads"] * env["head_dim"]
    env["kv_dim"] = env["n_kv_heads"] * env["head_dim"]
    for name, width in SCRATCH.items():
        env[f"stride_{name}"] = -(-evaluate(width, env) // 4) * 4
    env["stride_logits"] = -(-env["vocab"] // 4) * 4
    env["stride_src"] = env["stride_h"]  # the head's input rows have the residual stream's stride
    env.update(pool_ctx=pool_ctx, rows=rows)
    env["kv_splits"] = int(evaluate(KV_SPLITS["gpu" if real_gpu else "cpu"], env)) if kv_splits is None else kv_splits
    return env


_FUNCTIONS = {"cdiv": lambda a, b: -(-a // b), "min": min, "max": max, "sqrt": math.sqrt}
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}


def evaluate(expr, env: dict):
    """An expression of the program (see the module docstring) under ``env``."""
    if isinstance(expr, (int, float)) and not isinstance(expr, bool):
        return expr

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in env:
                raise KeyError(f"layer program: unknown name {node.id!r} in {expr!r}")
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq):
            return int(ev(node.left) == ev(node.comparators[0]))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords:
            return _FUNCTIONS[node.func.id](*(ev(a) for a in node.args))
        raise ValueError(f"layer program: {ast.dump(node)} is not allowed in {expr!r}")

    return ev(ast.parse(str(expr), mode="eval").body)


def workgroup(op: dict, real_gpu: bool, env: dict):
    """An op's preferred workgroup size (before the device caps it)."""
    wg = op["wg"]
    if isinstance(wg, dict):
        wg = wg["gpu" if real_gpu else "cpu"]
    return evaluate(wg, env)

"""Two layers and the head of a model as a tab is sent them, and NumpyBackend's answer for them:
the one parity case the tab's engines (WebGPU in Chromium, WASM and plain JS in node) are checked
against, whatever weights the test brings (SmolLM2's, a rotated tiny model's)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

from model.embedding import embed
from protocol.blobs import pack_head, pack_layer
from protocol.model_types import SessionSlice
from tab_worker.numpy_backend import NumpyBackend

ROOT = Path(__file__).resolve().parents[1]


def two_layer_case(w, token_ids: list[int]):
    """(files, x, the numpy backend, its hidden states): files are layer0.blob, layer1.blob,
    head.blob, config.json and x.f32 (the tokens' embeddings); the hidden states are a prefill
    of all but the last token, then one decode step."""
    files = {f"layer{i}.blob": pack_layer(i, w.layers[i]) for i in (0, 1)}
    files["head.blob"] = pack_head(w.head)
    files["config.json"] = json.dumps(w.config.to_dict()).encode()
    x = embed(w.embedding, token_ids)
    files["x.f32"] = x.astype("<f4").tobytes()
    be = NumpyBackend(w.config, {0: w.layers[0], 1: w.layers[1]}, w.head, 64)
    n = len(token_ids) - 1
    want = np.concatenate([be.forward([SessionSlice("s", 0, n)], x[:n]), be.forward([SessionSlice("s", n, 1)], x[n:])])
    return files, x, be, want


def run_tab_cpu_engines(node: str, dist: Path, files: dict, folder: Path) -> list[dict]:
    """The tab's WASM and plain-JS engines on `files` (written to `folder`), in node
    (tests/js/cpu_backend_parity.mjs): one result per engine, wasm then js."""
    for name, data in files.items():
        (folder / name).write_bytes(data)
    r = subprocess.run([node, str(ROOT / "tests" / "js" / "cpu_backend_parity.mjs"), str(dist), str(folder)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    results = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["engine"] for e in results] == ["wasm", "js"]
    return results

"""tabshard's quantized model file (``.tsq``), written by ``tabshard quantize``.

The container is safetensors (https://github.com/huggingface/safetensors), written and read
here without the library:

    u64 little-endian N | N bytes of JSON header (space-padded to a multiple of 8) | data

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets into the data section) plus ``"__metadata__"``, a map of strings to strings:

``format``   ``"tabshard-quantized"``;  ``version``  ``"1"``
``config``   JSON of protocol.model_types.ModelConfig
``fields``   JSON of the source GGUF's metadata (``general.*``, ``{arch}.*``, ``tokenizer.*``),
             so ``.field(key)`` and tabshard.tokenizer.GGUFTokenizer work as on the GGUF
``tensors``  JSON ``{name: {"spec": "s3g32", "n": rows, "k": inputs}}`` for every packed matrix
``plan``     JSON ``{tensor: choice}`` as chosen (e.g. ``"gptq:s3g32"`` or ``"source"``)
``report``   JSON of what the quantizer measured (optional, free-form)
``rotation`` JSON ``{"kind": "residual", "seed": S, "hidden": d, "folded": true, ...}`` when the
             weights were quantized in a rotated basis (tabshard/rotation.py). ``residual``:
             the seed rebuilds Q, folded into the weights, so a runtime needs nothing from it.
             ``ffn`` (kind ``"ffn"`` or ``"residual+ffn"``): each FFN's hidden space rotated
             with ``ffn_seed``'s signs (folded into ffn_up) and a block Walsh-Hadamard of
             ``ffn_block`` whose transpose is folded into the input side of the tensors in
             ``ffn_tensors`` (every ``blk.{i}.ffn_down``); the runtime applies the transform
             itself, told by the config's ``ffn_hadamard`` (= ffn_block), which the reader
             checks against this record. A rotation a runtime had to apply and that no
             config field names would say ``"folded": false``: this reader refuses it.

Packed matrices (kernels/quant.py's layout, unchanged) are two U32 tensors each,
``{name}.qweight`` [n, words] and ``{name}.scales`` [n, scale_words]; names are the GGUF's without
``.weight``: ``token_embd``, ``output`` (only when untied), ``blk.{i}.attn_q`` ... ``blk.{i}.ffn_down``.
Norm vectors are F32: ``blk.{i}.attn_norm``, ``blk.{i}.ffn_norm``, ``output_norm``.
The head is tied to the embedding when no ``output`` tensor is present.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kernels.quant import QuantSpec, QuantTensor, scale_words_per_row, words_per_row
from protocol.model_types import HeadWeights, LayerWeights, ModelConfig, ModelWeights
from protocol.errors import ModelError

FORMAT = "tabshard-quantized"
VERSION = "1"
_ATTR_NAME = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
              "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}
_DTYPES = {"U32": np.uint32, "F32": np.float32}


@dataclass(frozen=True)
class Rotation:
    """How a .tsq's weights were rotated before quantization."""

    seed: int | None  # the residual rotation's (None: the residual basis is the source's)
    hidden: int
    kind: str = "residual"
    folded: bool = True
    ffn_seed: int | None = None
    ffn_block: int | None = None
    ffn_tensors: tuple = ()

    @staticmethod
    def of(seed: int | None, config: ModelConfig, ffn_seed: int | None = None) -> "Rotation":
        """The record of a residual rotation (seed) and/or an FFN rotation (ffn_seed, whose block
        is config.ffn_hadamard) of a model of this config."""
        kind = "+".join(k for k, on in (("residual", seed is not None), ("ffn", ffn_seed is not None)) if on)
        if not kind:
            raise ValueError("a rotation needs a residual seed, an FFN seed or both")
        ffn = ffn_seed is not None
        return Rotation(seed=seed, hidden=config.hidden, kind=kind, ffn_seed=ffn_seed,
                        ffn_block=config.ffn_hadamard if ffn else None,
                        ffn_tensors=tuple(f"blk.{i}.ffn_down" for i in range(config.n_layers)) if ffn else ())


def source_fields(model) -> dict:
    """The metadata a .tsq carries over from its source model (GGUF or .tsq)."""
    if isinstance(model, QuantizedModel):
        return dict(model.fields)
    out = {}
    for key in model.reader.fields:
        if key.startswith("GGUF."):
            continue
        v = model.field(key)
        if isinstance(v, (str, int, float, bool, list)) or v is None:
            out[key] = v
    return out


def write(path: str | os.PathLike, weights: ModelWeights, fields: dict, plan: dict | None = None,
          report: dict | None = None, rotation: Rotation | None = None) -> int:
    """Write weights as a .tsq; returns the file's size in bytes."""
    arrays: dict[str, np.ndarray] = {}
    specs: dict[str, dict] = {}

    def put_matrix(name: str, t: QuantTensor):
        arrays[f"{name}.qweight"] = t.qweight
        arrays[f"{name}.scales"] = t.scales
        specs[name] = {"spec": t.spec.name, "n": t.n, "k": t.k}

    put_matrix("token_embd", weights.embedding)
    for i, lw in enumerate(weights.layers):
        arrays[f"blk.{i}.attn_norm"] = np.asarray(lw.attn_norm, np.float32)
        arrays[f"blk.{i}.ffn_norm"] = np.asarray(lw.ffn_norm, np.float32)
        for attr, name in _ATTR_NAME.items():
            put_matrix(f"blk.{i}.{name}", getattr(lw, attr))
    arrays["output_norm"] = np.asarray(weights.head.output_norm, np.float32)
    if weights.head.output is not weights.embedding:
        put_matrix("output", weights.head.output)
    header: dict = {"__metadata__": {
        "format": FORMAT, "version": VERSION,
        "config": json.dumps(weights.config.to_dict()),
        "fields": json.dumps(fields),
        "tensors": json.dumps(specs),
        "plan": json.dumps(plan or {}),
        "report": json.dumps(report or {}),
    }}
    if rotation is not None:
        header["__metadata__"]["rotation"] = json.dumps(asdict(rotation))
    offset = 0
    for name, a in arrays.items():
        dtype = "U32" if a.dtype == np.uint32 else "F32"
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = Path(str(path) + ".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays.values():
            f.write(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    os.replace(tmp, path)
    return os.path.getsize(path)


class QuantizedModel:
    """An opened .tsq: the same interface as model.loader.GGUFModel (path, config, field,
    layer, embedding, head, load_all)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"model file {str(self.path)!r} does not exist")
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 1 << 28:
                    raise ValueError("header too large")
                header = json.loads(f.read(n))
            meta = header.pop("__metadata__")
            if meta.get("format") != FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}")
            if meta.get("version") != VERSION:
                raise ModelError(f"{self.path.name} is .tsq version {meta.get('version')}; this tabshard reads version {VERSION}")
            self.config = ModelConfig.from_dict(json.loads(meta["config"]))
            self.fields = json.loads(meta["fields"])
            self.specs = json.loads(meta["tensors"])
            self.plan = json.loads(meta.get("plan", "{}"))
            self.report = json.loads(meta.get("report", "{}"))
            rot = json.loads(meta["rotation"]) if "rotation" in meta else None
            self.rotation = None if rot is None else Rotation(**{**rot, "ffn_tensors": tuple(rot.get("ffn_tensors", ()))})
            if self.rotation is not None and not self.rotation.folded:
                raise ModelError(f"{self.path.name} needs a run-time rotation ({self.rotation.kind}), which this tabshard does not apply")
            self._check_ffn_rotation()
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=8 + n)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"{self.path.name} is not a readable .tsq file ({type(exc).__name__}: {exc})") from None
        self._header = header

    def _check_ffn_rotation(self) -> None:
        """The config's ffn_hadamard (what runtimes apply) must be what the rotation record says
        was folded, on every layer's ffn_down, in a block the kernels can run."""
        from kernels.reference import check_hadamard_block

        c, r = self.config, self.rotation
        block = (r.ffn_block or 0) if r is not None else 0
        if c.ffn_hadamard != block:
            raise ModelError(f"{self.path.name}: config ffn_hadamard {c.ffn_hadamard} disagrees with the rotation record's "
                             f"FFN block {block or None}")
        if not block:
            return
        try:
            check_hadamard_block(block, c.ffn)
        except ValueError as exc:
            raise ModelError(f"{self.path.name}: {exc}") from None
        want = [f"blk.{i}.ffn_down" for i in range(c.n_layers)]
        if list(r.ffn_tensors) != want:
            raise ModelError(f"{self.path.name}: the FFN rotation must cover every layer's ffn_down, not {list(r.ffn_tensors)[:4]}...")

    def field(self, key: str, default=None):
        return self.fields.get(key, default)

    def _array(self, name: str) -> np.ndarray:
        h = self._header.get(name)
        if h is None:
            raise ModelError(f"{self.path.name} lacks tensor {name!r}")
        a, b = h["data_offsets"]
        dtype = _DTYPES[h["dtype"]]
        arr = np.frombuffer(self._data[a:b], dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
        return arr.reshape(h["shape"])

    def matrix(self, name: str) -> QuantTensor:
        s = self.specs[name]
        spec, n, k = QuantSpec.parse(s["spec"]), int(s["n"]), int(s["k"])
        qw, sc = self._array(f"{name}.qweight"), self._array(f"{name}.scales")
        if qw.shape != (n, words_per_row(k, spec)) or sc.shape != (n, scale_words_per_row(k, spec)):
            raise ModelError(f"{self.path.name}: tensor {name} has shapes {qw.shape}/{sc.shape}, not those of {spec.name} ({n}, {k})")
        return QuantTensor(spec, n, k, np.ascontiguousarray(qw), np.ascontiguousarray(sc))

    def layer(self, i: int) -> LayerWeights:
        return LayerWeights(
            attn_norm=self._array(f"blk.{i}.attn_norm").copy(),
            ffn_norm=self._array(f"blk.{i}.ffn_norm").copy(),
            **{attr: self.matrix(f"blk.{i}.{name}") for attr, name in _ATTR_NAME.items()},
        )

    def embedding(self) -> QuantTensor:
        return self.matrix("token_embd")

    def head(self, embedding: QuantTensor | None = None) -> HeadWeights:
        out = self.matrix("output") if "output" in self.specs else (embedding or self.embedding())
        return HeadWeights(output_norm=self._array("output_norm").copy(), output=out)

    def load_all(self) -> ModelWeights:
        emb = self.embedding()
        return ModelWeights(config=self.config, embedding=emb,
                            layers=[self.layer(i) for i in range(self.config.n_layers)], head=self.head(emb))

"""Weight blobs: one self-describing, checksummed byte string per layer (and one for the head).

A blob is a plain msgpack map that the wire codec writes and reads (protocol/wire.py: its
tensor encoding, its zero-copy reader), so the browser decodes it with the same codec as every
message. Its sha256 is its identity: a tab that already holds a blob with that hash (in memory,
or in the browser's Cache API) skips the download. Blobs travel in chunks of CHUNK_BYTES, each
with its own sha256.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from kernels.quant import QuantSpec, QuantTensor
from protocol.model_types import HeadWeights, LayerWeights
from protocol import wire

CHUNK_BYTES = 1 << 20
# What a blob may hold: wire's limits, with tensors of any size (a 7B head is 32000 x 4096) in
# the two dtypes a backend takes, and frames as large as the biggest layer
BLOB_LIMITS = wire.Limits(max_frame_bytes=1 << 40, max_tensor_elements=1 << 40,
                          allowed_dtypes=frozenset({"f32", "u32"}))


class BlobError(ValueError):
    """A weight blob or chunk that is corrupt or does not describe what it claims."""


def _array(a) -> np.ndarray:
    if not isinstance(a, np.ndarray):  # wire.decode made every tensor map an array
        raise BlobError(f"bad tensor in weight blob: a {type(a).__name__}")
    return a


def _quant(t: QuantTensor) -> dict:
    return {"spec": t.spec.name, "n": t.n, "k": t.k, "q": t.qweight, "s": t.scales}


def _unquant(d: dict) -> QuantTensor:
    return QuantTensor(QuantSpec.parse(d["spec"]), int(d["n"]), int(d["k"]), _array(d["q"]), _array(d["s"]))


def pack_layer(index: int, w: LayerWeights) -> bytes:
    body = {"kind": "layer", "index": index, "attn_norm": w.attn_norm, "ffn_norm": w.ffn_norm}
    body.update({m: _quant(getattr(w, m)) for m in LayerWeights.MATRICES})
    return wire.encode(body, validate=False)


def pack_head(h: HeadWeights) -> bytes:
    return wire.encode({"kind": "head", "output_norm": h.output_norm, "output": _quant(h.output)}, validate=False)


def unpack_blob(data: bytes, zero_copy: bool = False) -> tuple[str, int | None, LayerWeights | HeadWeights]:
    """zero_copy: tensors are read-only views of `data` (which they keep alive) instead of
    copies, so a worker that keeps the blob holds its weights once, not twice."""
    try:
        body = wire.decode(data, BLOB_LIMITS, validate=False, zero_copy=zero_copy, view_min_bytes=0)
        if body["kind"] == "layer":
            w = LayerWeights(
                attn_norm=_array(body["attn_norm"]).copy(), ffn_norm=_array(body["ffn_norm"]).copy(),
                **{m: _unquant(body[m]) for m in LayerWeights.MATRICES},
            )
            return "layer", int(body["index"]), w
        if body["kind"] == "head":
            return "head", None, HeadWeights(output_norm=_array(body["output_norm"]).copy(), output=_unquant(body["output"]))
    except BlobError:
        raise
    except Exception as exc:  # wire.ProtocolError for bad bytes, KeyError/ValueError for a bad layout
        raise BlobError(f"weight blob does not decode: {type(exc).__name__}: {exc}") from None
    raise BlobError(f"weight blob of unknown kind {body.get('kind')!r}")


def sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class BlobInfo:
    """What the coordinator announces about a blob in an assignment."""

    key: str  # "layer:3" or "head"
    sha256: str
    size: int
    chunks: int

    def to_dict(self) -> dict:
        return {"key": self.key, "sha256": self.sha256, "size": self.size, "chunks": self.chunks}


def blob_info(key: str, data: bytes) -> BlobInfo:
    return BlobInfo(key, sha256(data), len(data), max(1, -(-len(data) // CHUNK_BYTES)))


def chunk(data: bytes, index: int) -> memoryview:
    return memoryview(data)[index * CHUNK_BYTES : (index + 1) * CHUNK_BYTES]


class BlobAssembler:
    """Collects a blob's chunks (in any order, each checked), resumable: `have` says which
    chunk indices already arrived so a reconnecting worker can ask only for the rest.

    The buffer is not zeroed up front and the whole blob is not copied at the end: each page is
    first touched by the chunk that fills it, as the download goes, and the finished blob is a
    read-only view of that one buffer. A zero fill at the assignment touched a range's every page
    at once (a burst of page faults that, on a host shared with running workers, lengthened
    their steps: see bench_plans' join), and the copy held each blob twice while loading."""

    def __init__(self, info: BlobInfo):
        self.info = info
        self.buf = np.empty(info.size, np.uint8)
        self.have: set[int] = set()

    def add(self, index: int, offset: int, data, digest: str) -> bool:
        """data: the chunk's bytes (bytes, or any buffer of bytes: a view into the frame)."""
        if not (0 <= index < self.info.chunks) or offset != index * CHUNK_BYTES:
            raise BlobError(f"chunk {index} at offset {offset} does not belong to blob {self.info.key}")
        data = memoryview(data).cast("B")
        if offset + data.nbytes > self.info.size:
            raise BlobError(f"chunk {index} of {self.info.key} overruns the blob size {self.info.size}")
        if index < self.info.chunks - 1 and data.nbytes != CHUNK_BYTES or index == self.info.chunks - 1 \
                and offset + data.nbytes != self.info.size:
            # (every byte of the blob is written by exactly one chunk: none is left unset)
            raise BlobError(f"chunk {index} of {self.info.key} has {data.nbytes} bytes, not the chunk's size")
        if sha256(data) != digest:
            raise BlobError(f"chunk {index} of {self.info.key} fails its checksum")
        self.buf[offset : offset + data.nbytes] = np.frombuffer(data, np.uint8)
        self.have.add(index)
        return self.complete

    @property
    def complete(self) -> bool:
        return len(self.have) == self.info.chunks

    @property
    def received_bytes(self) -> int:
        last = self.info.chunks - 1  # the only chunk that may be short
        return len(self.have) * CHUNK_BYTES - (CHUNK_BYTES * self.info.chunks - self.info.size if last in self.have else 0)

    def result(self) -> memoryview:
        """The whole blob, checked: a read-only view of the buffer the chunks filled."""
        data = memoryview(self.buf).toreadonly()
        if sha256(data) != self.info.sha256:
            raise BlobError(f"blob {self.info.key} fails its checksum after assembly")
        return data

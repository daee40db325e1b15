"""Weight blobs go through the wire codec (protocol/wire.py) and keep their format: the bytes are
the msgpack map of the wire's tensor encoding spelled out by hand here (a blob's sha256 is its
identity: tabs cache blobs by it), zero-copy unpacking views every tensor, and bad blobs are
BlobErrors."""
import msgpack
import numpy as np
import pytest

from protocol.model_types import LayerWeights
from protocol.blobs import CHUNK_BYTES, BlobAssembler, BlobError, blob_info, chunk, pack_head, pack_layer, sha256, unpack_blob


def by_hand(a: np.ndarray) -> dict:
    return {"__t": {np.dtype(np.float32): "f32", np.dtype(np.uint32): "u32"}[a.dtype], "s": list(a.shape),
            "b": np.ascontiguousarray(a).tobytes()}


def quant_by_hand(t) -> dict:
    return {"spec": t.spec.name, "n": t.n, "k": t.k, "q": by_hand(t.qweight), "s": by_hand(t.scales)}


def test_blob_bytes_are_the_wire_tensor_maps(weights):
    lw = weights.layers[3]
    body = {"kind": "layer", "index": 3, "attn_norm": by_hand(lw.attn_norm), "ffn_norm": by_hand(lw.ffn_norm)}
    body.update({m: quant_by_hand(getattr(lw, m)) for m in LayerWeights.MATRICES})
    assert pack_layer(3, lw) == msgpack.packb(body)
    h = weights.head
    assert pack_head(h) == msgpack.packb({"kind": "head", "output_norm": by_hand(h.output_norm), "output": quant_by_hand(h.output)})


@pytest.mark.parametrize("zero_copy", [False, True])
def test_unpack_round_trips_and_views_only_when_asked(weights, zero_copy):
    lw = weights.layers[1]
    blob = pack_layer(1, lw)
    kind, index, got = unpack_blob(blob, zero_copy=zero_copy)
    assert (kind, index) == ("layer", 1)
    buf = np.frombuffer(blob, np.uint8)
    for m in LayerWeights.MATRICES:
        a, b = getattr(lw, m), getattr(got, m)
        assert (a.spec, a.n, a.k) == (b.spec, b.n, b.k)
        for x, y in ((a.qweight, b.qweight), (a.scales, b.scales)):
            assert x.dtype == y.dtype and np.array_equal(x, y) and not y.flags.writeable
            assert np.shares_memory(y, buf) == zero_copy  # every tensor, however small
    assert np.array_equal(got.attn_norm, lw.attn_norm) and got.attn_norm.flags.writeable  # norms are copies
    kind, _, head = unpack_blob(pack_head(weights.head), zero_copy=zero_copy)
    assert kind == "head" and np.array_equal(head.output.qweight, weights.head.output.qweight)


@pytest.mark.parametrize("zero_copy", [False, True])
def test_bad_blobs_are_blob_errors(weights, zero_copy):
    good = pack_layer(0, weights.layers[0])
    f64 = msgpack.packb({"kind": "head", "output_norm": {"__t": "f64", "s": [1], "b": bytes(8)}, "output": {}})
    not_tensor = msgpack.packb({"kind": "head", "output_norm": 3, "output": {}})
    for bad in (b"", b"\x80", good[:-3], good + b"\x00", f64, not_tensor, msgpack.packb({"kind": "tail"})):
        with pytest.raises(BlobError):
            unpack_blob(bad, zero_copy=zero_copy)


def test_chunks_assemble_in_any_order_into_one_buffer_the_blob_views():
    """A blob's chunks (any order, as a resumed download sends them) fill one buffer, and the
    finished blob is a read-only view of it (each blob held once while loading, not copied at
    the end); a chunk of the wrong length or bytes is refused naming the blob, and the blob is
    not complete without it."""
    data = np.random.default_rng(1).integers(0, 256, 3 * CHUNK_BYTES + 1234, np.uint8).tobytes()
    info = blob_info("layer:7", data)
    asm = BlobAssembler(info)
    for i in (3, 1, 0):
        assert not asm.add(i, i * CHUNK_BYTES, chunk(data, i), sha256(chunk(data, i)))
    short = chunk(data, 2)[:-1]
    with pytest.raises(BlobError, match="chunk 2 of layer:7 has"):
        asm.add(2, 2 * CHUNK_BYTES, short, sha256(short))
    with pytest.raises(BlobError, match="chunk 2 of layer:7 fails its checksum"):
        asm.add(2, 2 * CHUNK_BYTES, chunk(data, 1), sha256(chunk(data, 2)))
    assert not asm.complete and asm.received_bytes == 2 * CHUNK_BYTES + 1234
    assert asm.add(2, 2 * CHUNK_BYTES, chunk(data, 2), sha256(chunk(data, 2)))
    blob = asm.result()
    assert blob == data and blob.readonly and np.shares_memory(np.frombuffer(blob, np.uint8), asm.buf)
    empty = BlobAssembler(blob_info("head", b""))
    assert empty.add(0, 0, b"", sha256(b"")) and empty.result() == b""

"""What the wire tests share: one sample of every message type, a deep comparison, and the
module-wide fixture that runs a test module's tests once per decoder (msgpack's C unpacker for
these small frames, then the zero-copy reader with ZERO_COPY_MIN_BYTES = 0)."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import msgpack
import numpy as np
import pytest

from protocol import wire
from protocol.format import DEFAULT_LIMITS, Limits, ProtocolError
from protocol.wire import decode, make

VECTORS_DIR = Path(__file__).parent / "vectors"


@pytest.fixture(scope="module", autouse=True, params=["c_unpacker", "zero_copy_reader"])
def decoder(request):
    """Which decoder ``decode`` uses for the frames of this module's tests (all small)."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "zero_copy_reader":
            patch.setattr(wire, "ZERO_COPY_MIN_BYTES", 0)
        yield request.param


# ---------------------------------------------------------------------------------------------
# One sample of every message type


def f32(*values, shape=None):
    array = np.array(values, np.float32)
    return array.reshape(shape) if shape else array


SAMPLES: dict[str, dict] = {
    "hello": make("hello", worker_name="tab-3", token="s3cret", capabilities={"f16": False,
                  "max_buffer": 1 << 30, "adapter": "SwiftShader"}, resume={"worker_id": "w7"}),
    "measurement": make("measurement", step_ms=3.25, details={"gflops": 1.5}),
    "load_progress": make("load_progress", layer=4, received_bytes=1 << 20, total_bytes=3 << 20),
    "weights_ack": make("weights_ack", chunk_id=12, ok=False, error="sha256 mismatch"),
    "ready": make("ready", layers=[0, 1, 2, 3], checksum="ab12"),
    "step_result": make("step_result", step_id=9, epoch=2,
                        output=np.linspace(-1, 1, 2 * 576, dtype=np.float32).reshape(2, 576),
                        topk_ids=np.array([[5, 7]], np.int32), topk_logits=f32(1.5, 0.25, shape=(1, 2)),
                        compute_ms=0.75),
    "heartbeat": make("heartbeat", seq=41, load={"queue": 0}),
    "refuse": make("refuse", reason="out_of_memory", detail={"need": 123}),
    "bye": make("bye", reason="tab closed"),
    "error": make("error", code="bad_field", field="hidden", message="hidden must be f32"),
    "welcome": make("welcome", worker_id="w7", heartbeat_ms=1000, epoch=3),
    "measure": make("measure", layers=2, tokens=8),
    "assign": make("assign", assignment_id=1, layer_start=0, layer_end=15, include_head=False,
                   precision={"weights": "q4_1"}, model={"name": "SmolLM2-135M", "hidden": 576},
                   chunks=[{"chunk_id": 0, "name": "blk.0.attn_q.weight", "bytes": 1024}]),
    "weights_chunk": make("weights_chunk", chunk_id=0, name="blk.0.attn_q.weight", offset=0,
                          total=300_000, data=bytes(range(256)) * 400, sha256="00" * 32),
    "step": make("step", step_id=9, epoch=2,
                 sessions=[{"session_id": "s1", "start_pos": 0, "length": 1},
                           {"session_id": "s2", "start_pos": 17, "length": 1}],
                 hidden=np.arange(2 * 576, dtype=np.float32).reshape(2, 576), want_topk=4),
    "drop_session": make("drop_session", session_id="s1"),
    "ping": make("ping", nonce=1234567),
    "pong": make("pong", nonce=1234567),
    "fork_session": make("fork_session", source_id="s1", session_id="s3", length=17),
    "copy_kv": make("copy_kv", session_id="s1", source_start=0, source_end=30, layer_start=12, layer_end=30, length=41),
    "kv_copied": make("kv_copied", session_id="s1", layer_start=12, layer_end=30, length=41, ok=False,
                      error="session s1 holds 40 positions, cannot copy 41"),
    "truncate_session": make("truncate_session", session_id="s1", length=12),
    "draft": make("draft", session_id="s1", context=[5, 17, 42, 99], k=3, trip=7),
    "draft_result": make("draft_result", session_id="s1", trip=7, tokens=[12, 12, 300]),
    "unload": make("unload", reason="rebalance"),
    "generate": make("generate", request_id="r1", messages=[{"role": "user", "content": "Hi"}],
                     max_tokens=16, temperature=0.7, top_p=0.9, top_k=40, seed=1, greedy=False),
    "cancel": make("cancel", request_id="r1"),
    "token": make("token", request_id="r1", index=0, token_id=2, text="Hello"),
    "done": make("done", request_id="r1", finish_reason="stop", usage={"prompt_tokens": 3}),
    "rewind": make("rewind", request_id="r1", index=3, retract_chars=7, reason="liar caught"),
}


def assert_same(actual, expected, path="message"):
    """Equality for decoded messages: arrays by dtype, shape and value; tuples as lists."""
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), path
        assert actual.dtype == expected.dtype.newbyteorder("<") or actual.dtype == expected.dtype, path
        assert actual.shape == expected.shape, path
        assert np.array_equal(actual, expected), path
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), path
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}.{index}")
    elif isinstance(expected, (bytes, bytearray, memoryview)):
        if isinstance(actual, memoryview):  # the zero-copy reader's view of a big bin
            assert actual.readonly and actual.nbytes >= wire.SPLICE_MIN_BYTES, path
        else:
            assert type(actual) is bytes, path
        assert actual == bytes(expected), path
    elif isinstance(expected, float) and math.isnan(expected):
        assert isinstance(actual, float) and math.isnan(actual), path
    else:
        assert type(actual) is type(expected) and actual == expected, path


NUMPY_DTYPES = {"f32": np.float32, "f16": np.float16, "i32": np.int32, "u32": np.uint32,
                "u8": np.uint8, "i8": np.int8, "i64": np.int64}


def sample_array(name: str, shape: tuple) -> np.ndarray:
    count = math.prod(shape)
    values = np.arange(count) * 37 % 101 - 50
    if name.startswith("u"):
        values = np.abs(values)
    return values.astype(NUMPY_DTYPES[name]).reshape(shape)


def pack(obj) -> bytes:
    return msgpack.packb(obj)


def tensor_map(dtype="f32", shape=(2,), data=None, **extra):
    if data is None:
        data = bytes(4 * math.prod(shape))
    return {"__t": dtype, "s": list(shape), "b": data, **extra}


def hb(**fields) -> dict:
    return make("heartbeat", seq=1, **fields)


def outcome(frame, zero_copy: bool, limits: Limits = DEFAULT_LIMITS, validate: bool = True):
    """What decode did, comparable between the decoders: ("ok", message) or the error."""
    try:
        return "ok", comparable(decode(frame, limits, validate=validate, zero_copy=zero_copy))
    except ProtocolError as err:
        assert err.code and isinstance(err.message, str)
        return "error", err.code, err.field


def comparable(value):
    """A decoded value as plain comparable data: floats by their bits (NaN == NaN), bins by their
    bytes, whether bytes or the reader's view of a big bin."""
    if isinstance(value, np.ndarray):
        return "tensor", value.dtype.str, value.shape, value.tobytes()
    if isinstance(value, memoryview):
        assert value.readonly and value.nbytes >= wire.SPLICE_MIN_BYTES
        return "bin", value.tobytes()
    if isinstance(value, bytes):
        return "bin", value
    if isinstance(value, float):
        return "float", struct.pack(">d", value)
    if isinstance(value, dict):
        return "map", [(comparable(key), comparable(item)) for key, item in value.items()]
    if isinstance(value, list):
        return "list", [comparable(item) for item in value]
    return type(value).__name__, value

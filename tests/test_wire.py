"""Tests for protocol/wire.py: round trips, bad input -> ProtocolError, golden vectors, and the two
decoders (msgpack's C unpacker, the zero-copy reader) agreeing.

Every test here runs twice (the module-wide fixture ``decoder``): once as decode picks by frame
size, so these small frames go through the C unpacker, and once with ZERO_COPY_MIN_BYTES = 0,
so every frame goes through the zero-copy reader.

The golden vectors in tests/vectors/ are written only on purpose:

    .venv/bin/python tests/test_wire.py --write-vectors
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from protocol import format, messages, msgpack_reader, wire
from protocol.format import DEFAULT_LIMITS, Limits, ProtocolError
from protocol.wire import decode, encode, make

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
    "calibration_result": make("calibration_result", step_ms=3.25, details={"gflops": 1.5}),
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
    "calibrate": make("calibrate", layers=2, tokens=8),
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
    "fork_session": make("fork_session", source_id="s1", session_id="s3", length=17),
    "truncate_session": make("truncate_session", session_id="s1", length=12),
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


def test_samples_cover_every_message_type():
    assert set(SAMPLES) == set(messages.MESSAGES)


@pytest.mark.parametrize("type_", sorted(SAMPLES))
def test_round_trip_every_message_type(type_):
    msg = SAMPLES[type_]
    frame = encode(msg)
    assert isinstance(frame, bytes)
    assert_same(decode(frame), msg)
    # Plain msgpack reads it too: no extension types, tensors are ordinary maps.
    assert msgpack.unpackb(frame)["type"] == type_


def test_required_and_optional_fields_follow_the_table():
    step_result = messages.MESSAGES["step_result"]
    assert step_result.required == ("step_id", "epoch", "output")
    assert step_result.optional == ("topk_ids", "topk_logits", "compute_ms")
    assert messages.MESSAGES["error"].sender == "any"


def test_optional_fields_may_be_missing_or_nil():
    decode(encode(make("unload")))
    decode(encode(make("error", code="x", field=None, message="m")))


def test_float_fields_accept_ints_because_js_encodes_2_0_as_2():
    assert decode(encode(make("calibration_result", step_ms=2)))["step_ms"] == 2


def test_unknown_extra_fields_pass_through():
    msg = make("heartbeat", seq=1, future={"nested": [1, 2.5, None, b"x", True]})
    assert_same(decode(encode(msg)), msg)


def test_numpy_scalars_encode_as_plain_numbers():
    msg = make("token", request_id="r", index=np.int64(3), token_id=np.int32(7), text="t",
               extra=[np.float32(0.5), np.bool_(True)])
    decoded = decode(encode(msg))
    assert decoded["index"] == 3 and type(decoded["index"]) is int
    assert decoded["extra"] == [0.5, True]


def test_make_puts_version_and_type_first_and_keeps_key_order():
    msg = make("token", text="a", token_id=1, index=0, request_id="r")
    assert list(decode(encode(msg))) == ["v", "type", "text", "token_id", "index", "request_id"]
    assert encode(msg) == encode(dict(msg))


def test_docstring_byte_example():
    frame = encode(make("heartbeat", seq=7))
    assert frame.hex(" ") == "83 a1 76 01 a4 74 79 70 65 a9 68 65 61 72 74 62 65 61 74 a3 73 65 71 07"


def test_docstring_tensor_example():
    frame = encode(make("heartbeat", seq=7, x=f32(1.0, 2.0)), validate=False)
    assert frame.endswith(bytes.fromhex("a1 78 83 a3 5f 5f 74 a3 66 33 32 a1 73 91 02 a1 62 c4 08"
                                        "00 00 80 3f 00 00 00 40"))


# ---------------------------------------------------------------------------------------------
# Tensors

SHAPES = [(), (0,), (1,), (3,), (2, 0, 3), (7, 13), (1, 576), (3, 5, 7), (2, 1, 1, 1, 1, 1, 1, 3)]
NUMPY_DTYPES = {"f32": np.float32, "f16": np.float16, "i32": np.int32, "u32": np.uint32,
                "u8": np.uint8, "i8": np.int8, "i64": np.int64}


def sample_array(name: str, shape: tuple) -> np.ndarray:
    count = math.prod(shape)
    values = np.arange(count) * 37 % 101 - 50
    if name.startswith("u"):
        values = np.abs(values)
    return values.astype(NUMPY_DTYPES[name]).reshape(shape)


@pytest.mark.parametrize("name", sorted(NUMPY_DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tensor_round_trip_every_dtype_and_shape(name, shape):
    array = sample_array(name, shape)
    decoded = decode(encode(make("heartbeat", seq=1, t=array)))["t"]
    assert decoded.dtype == wire.DTYPES[name] and decoded.shape == shape
    assert np.array_equal(decoded, array)


def test_dtype_names_match_numpy():
    assert set(NUMPY_DTYPES) == set(wire.DTYPES)
    for name, numpy_type in NUMPY_DTYPES.items():
        assert wire.DTYPES[name] == np.dtype(numpy_type)


def test_tensor_bytes_are_little_endian_c_order():
    array = np.array([[1, 2], [3, 4]], np.int32)
    raw = msgpack.unpackb(encode(make("heartbeat", seq=1, t=array)))["t"]
    assert raw == {"__t": "i32", "s": [2, 2], "b": np.array([1, 2, 3, 4], "<i4").tobytes()}


@pytest.mark.parametrize("make_input", [
    lambda a: a.astype(">f4"),                         # big-endian
    lambda a: np.asfortranarray(a),                    # Fortran order
    lambda a: a.T.copy().T,                            # transposed view
    lambda a: np.repeat(a, 2, axis=1)[:, ::2],         # strided
], ids=["big_endian", "fortran", "transposed", "strided"])
def test_non_native_arrays_are_converted_on_encode(make_input):
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    converted = make_input(array)
    assert np.array_equal(converted, array)
    assert encode(make("heartbeat", seq=1, t=converted)) == encode(make("heartbeat", seq=1, t=array))


def test_large_spliced_tensor_is_plain_msgpack_byte_for_byte():
    array = np.random.default_rng(0).random((300, 577), dtype=np.float32)  # > SPLICE_MIN_BYTES
    assert array.nbytes >= wire.SPLICE_MIN_BYTES
    msg = make("step_result", step_id=1, epoch=0, output=array,
               nested=[{"t": array}])  # nested: through the Packer's default hook
    plain = dict(msg, output={"__t": "f32", "s": [300, 577], "b": array.tobytes()},
                 nested=[{"t": {"__t": "f32", "s": [300, 577], "b": array.tobytes()}}])
    assert encode(msg) == msgpack.packb(plain)
    assert_same(decode(encode(msg)), msg)


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536, 70000])
def test_bin_header_is_the_smallest_form(size):
    data = bytes(size)
    assert wire._bin_header(size) + data == msgpack.packb(data)
    msg = make("weights_chunk", chunk_id=0, name="n", offset=0, total=size, data=data, sha256="")
    assert encode(msg) == msgpack.packb(msg)


def test_bytes_like_fields_encode_as_bin():
    for data in (bytearray(b"abc"), memoryview(b"abc"), bytearray(70000), memoryview(bytes(70000))):
        msg = make("weights_chunk", chunk_id=0, name="n", offset=0, total=3, data=data, sha256="")
        assert decode(encode(msg))["data"] == bytes(data)


def test_decode_does_not_copy_tensor_bytes(decoder):
    frame = encode(SAMPLES["step"])
    hidden = decode(frame)["hidden"]
    assert hidden.base is not None and not hidden.flags.owndata
    assert not hidden.flags.writeable            # documented: arrays are read-only
    if decoder == "c_unpacker":
        assert isinstance(hidden.base, bytes)    # a view of the bytes msgpack decoded
        assert np.shares_memory(hidden, np.frombuffer(hidden.base, np.uint8))
    else:  # small bins are copied by the reader too, so that they don't hold on to the frame
        assert not np.shares_memory(hidden, np.frombuffer(frame, np.uint8))


def test_tensors_nested_in_lists_and_maps():
    msg = make("heartbeat", seq=1, load={"a": [sample_array("i8", (2, 2)), {"b": f32(1.5)}]})
    decoded = decode(encode(msg))
    assert_same(decoded, msg)
    assert isinstance(decoded["load"]["a"][1]["b"], np.ndarray)


# ---------------------------------------------------------------------------------------------
# Encode refuses what cannot go on the wire


@pytest.mark.parametrize("msg, code, field", [
    (make("step_result", step_id=1, epoch=0, output=np.zeros(3)), "bad_field", "output"),
    (make("heartbeat", seq=1, t=np.zeros(3)), "bad_dtype", "t"),
    (make("heartbeat", seq=1, t=np.zeros(70000)), "bad_dtype", "t"),
    (make("heartbeat", seq=1, t=[{"x": np.zeros(3, bool)}]), "bad_dtype", "t"),
    (make("heartbeat", seq=1, t={1, 2}), "bad_field", "t"),
    (make("heartbeat", seq=1, t=2 ** 64), "bad_field", "t"),
    ({**make("heartbeat", seq=1), 5: "x"}, "bad_field", "5"),
    (make("heartbeat", seq="1"), "bad_field", "seq"),
    ([1, 2], "malformed", None),
])
def test_encode_refuses(msg, code, field):
    with pytest.raises(ProtocolError) as caught:
        encode(msg)
    assert (caught.value.code, caught.value.field) == (code, field)


def test_encode_f64_error_says_to_cast():
    with pytest.raises(ProtocolError, match="cast f64 to f32"):
        encode(make("heartbeat", seq=1, t=np.zeros(3)))


# ---------------------------------------------------------------------------------------------
# Decode refuses bad input with the right code and field


def pack(obj) -> bytes:
    return msgpack.packb(obj)


def tensor_map(dtype="f32", shape=(2,), data=None, **extra):
    if data is None:
        data = bytes(4 * math.prod(shape))
    return {"__t": dtype, "s": list(shape), "b": data, **extra}


def hb(**fields) -> dict:
    return make("heartbeat", seq=1, **fields)


def nested_lists(depth: int):
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


STEP_FIELDS = dict(step_id=1, epoch=0, sessions=[], hidden=tensor_map())

BAD_FRAMES = [
    # (id, frame, limits, code, field)
    ("garbage", b"\xc1", None, "malformed", None),
    ("empty", b"", None, "malformed", None),
    ("truncated", encode(SAMPLES["step"])[:-3], None, "malformed", None),
    ("trailing_bytes", encode(SAMPLES["bye"]) + b"\x00", None, "malformed", None),
    ("top_level_list", pack([1, "heartbeat"]), None, "malformed", None),
    ("top_level_int", pack(1), None, "malformed", None),
    ("int_key", pack({**hb(), 1: 2}), None, "malformed", None),
    ("bin_key", pack({**hb(), b"k": 2}), None, "malformed", None),
    ("nested_int_key", pack(hb(load={1: 2})), None, "malformed", None),
    ("nested_bin_key", pack(hb(load={b"k": 2})), None, "malformed", "load"),
    ("list_key", b"\x81\x91\x01\x02", None, "malformed", None),
    ("invalid_utf8", b"\x81\xa1v\xa2\xff\xfe", None, "malformed", None),
    ("ext_type", pack(hb(x=msgpack.ExtType(5, b"abc"))), None, "malformed", None),
    ("timestamp_ext", pack(hb(x=[msgpack.Timestamp(1)])), None, "malformed", "x.0"),
    ("too_deep", pack(hb(load={"a": nested_lists(16)})), None, "too_deep", "load.a" + ".0" * 14),
    ("msgpack_stack_overflow", b"\x81\xa1x" + b"\x91" * 5000 + b"\x01", None, "too_deep", None),
    ("frame_too_large", encode(SAMPLES["step"]), Limits(max_frame_bytes=1000), "frame_too_large", None),
    ("str_too_long", pack(hb(x="y" * 11)), Limits(max_str_len=10), "limit_exceeded", None),
    ("list_too_long", pack(hb(x=[1] * 11)), Limits(max_list_len=10), "limit_exceeded", None),
    ("map_too_long", pack(hb(x={str(i): i for i in range(11)})), Limits(max_list_len=10),
     "limit_exceeded", None),
    ("bin_too_long", pack(hb(x=bytes(2000))), Limits(max_frame_bytes=1500), "frame_too_large", None),
    # tensors
    ("f64_dtype", pack(hb(t=tensor_map("f64", (2,), bytes(16)))), None, "bad_dtype", "t"),
    ("unknown_dtype", pack(hb(t=tensor_map("bf16"))), None, "bad_dtype", "t"),
    ("dtype_not_str", pack(hb(t=tensor_map(7))), None, "bad_dtype", "t"),
    ("dtype_not_allowed", pack(hb(t=tensor_map("i8", (2,), b"ab"))),
     Limits(allowed_dtypes=frozenset({"f32"})), "bad_dtype", "t"),
    ("client_limits_refuse_tensors", pack(hb(t=tensor_map())), wire.CLIENT_LIMITS, "bad_dtype", "t"),
    ("negative_dim", pack(hb(t=tensor_map(shape=(2,), data=bytes(8)) | {"s": [-2]})), None,
     "bad_shape", "t"),
    ("shape_not_list", pack(hb(t=tensor_map() | {"s": 2})), None, "bad_shape", "t"),
    ("shape_float", pack(hb(t=tensor_map() | {"s": [2.0]})), None, "bad_shape", "t"),
    ("shape_bool", pack(hb(t=tensor_map() | {"s": [True, 2]})), None, "bad_shape", "t"),
    ("rank_9", pack(hb(t=tensor_map(shape=(1,) * 9, data=bytes(4)))), None, "bad_shape", "t"),
    ("absurd_shape", pack(hb(t=tensor_map() | {"s": [1 << 40, 1 << 40]})), None,
     "tensor_too_large", "t"),
    ("too_many_elements", pack(hb(t=tensor_map(shape=(11,)))), Limits(max_tensor_elements=10),
     "tensor_too_large", "t"),
    ("bytes_short", pack(hb(t=tensor_map(shape=(3,), data=bytes(11)))), None, "bad_shape", "t"),
    ("bytes_long", pack(hb(t=tensor_map(shape=(3,), data=bytes(13)))), None, "bad_shape", "t"),
    ("empty_with_bytes", pack(hb(t=tensor_map(shape=(0, 3), data=bytes(4)))), None, "bad_shape", "t"),
    ("data_not_bin", pack(hb(t=tensor_map(data="abcdefgh"))), None, "malformed", "t"),
    ("tensor_extra_key", pack(hb(t=tensor_map(x=1))), None, "malformed", "t"),
    ("tensor_missing_data", pack(hb(t={"__t": "f32", "s": [0]})), None, "malformed", "t"),
    ("nested_tensor_path", pack(hb(load={"a": [0, tensor_map("f64")]})), None, "bad_dtype", "load.a.1"),
    # schema
    ("version_2", pack({"v": 2, "type": "heartbeat", "seq": 1}), None, "version_mismatch", "v"),
    ("version_missing", pack({"type": "heartbeat", "seq": 1}), None, "bad_field", "v"),
    ("version_str", pack({"v": "1", "type": "heartbeat", "seq": 1}), None, "bad_field", "v"),
    ("version_bool", pack({"v": True, "type": "heartbeat", "seq": 1}), None, "bad_field", "v"),
    ("type_missing", pack({"v": 1, "seq": 1}), None, "bad_field", "type"),
    ("type_not_str", pack({"v": 1, "type": 3}), None, "bad_field", "type"),
    ("unknown_type", pack({"v": 1, "type": "teleport"}), None, "unknown_type", "type"),
    ("missing_field", pack(make("heartbeat")), None, "bad_field", "seq"),
    ("nil_required_field", pack(make("heartbeat", seq=None)), None, "bad_field", "seq"),
    ("int_as_str", pack(make("heartbeat", seq="1")), None, "bad_field", "seq"),
    ("bool_as_int", pack(make("heartbeat", seq=True)), None, "bad_field", "seq"),
    ("int_as_bool", pack(make("weights_ack", chunk_id=1, ok=1)), None, "bad_field", "ok"),
    ("float_as_str", pack(make("calibration_result", step_ms="3")), None, "bad_field", "step_ms"),
    ("str_as_bin", pack(make("bye", reason=b"x")), None, "bad_field", "reason"),
    ("bytes_as_str", pack(make("weights_chunk", chunk_id=0, name="n", offset=0, total=1,
                               data="x", sha256="")), None, "bad_field", "data"),
    ("dict_as_list", pack(make("hello", worker_name="w", capabilities=[])), None, "bad_field",
     "capabilities"),
    ("optional_wrong_type", pack(make("hello", worker_name="w", capabilities={}, token=5)), None,
     "bad_field", "token"),
    ("list_of_int_item", pack(make("ready", layers=[1, "2"], checksum="")), None, "bad_field",
     "layers.1"),
    ("session_field", pack(make("step", **STEP_FIELDS | {"sessions": [
        {"session_id": "a", "start_pos": 0, "length": 1},
        {"session_id": "b", "start_pos": 0, "length": "1"}]})), None, "bad_field", "sessions.1.length"),
    ("session_missing_field", pack(make("step", **STEP_FIELDS | {"sessions": [{"session_id": "a"}]})),
     None, "bad_field", "sessions.0.start_pos"),
    ("session_not_map", pack(make("step", **STEP_FIELDS | {"sessions": ["a"]})), None, "bad_field",
     "sessions.0"),
    ("tensor_wrong_dtype", pack(make("step", **STEP_FIELDS | {"hidden": tensor_map("i32")})), None,
     "bad_field", "hidden"),
    ("tensor_as_list", pack(make("step", **STEP_FIELDS | {"hidden": [1.0, 2.0]})), None, "bad_field",
     "hidden"),
]


@pytest.mark.parametrize("frame, limits, code, field", [case[1:] for case in BAD_FRAMES],
                         ids=[case[0] for case in BAD_FRAMES])
def test_decode_refuses(frame, limits, code, field):
    with pytest.raises(ProtocolError) as caught:
        decode(frame, limits or DEFAULT_LIMITS)
    err = caught.value
    assert (err.code, err.field) == (code, field), err.message
    if field is not None:
        assert repr(field) in err.message or field in err.message  # the message names the field


@pytest.mark.parametrize("not_bytes", ["a str", None, 42, [1, 2]])
def test_decode_refuses_non_bytes(not_bytes):
    with pytest.raises(ProtocolError) as caught:
        decode(not_bytes)
    assert caught.value.code == "malformed"


def test_decode_accepts_bytearray_and_memoryview():
    frame = encode(SAMPLES["step"])
    for data in (bytearray(frame), memoryview(frame)):
        assert_same(decode(data), SAMPLES["step"])


def test_frame_size_is_checked_before_unpacking(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("unpacked an oversized frame")
    monkeypatch.setattr(msgpack, "unpackb", fail)
    monkeypatch.setattr(wire, "read_msgpack", fail)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decode(bytes(101), Limits(max_frame_bytes=100))


def test_validate_false_skips_the_schema_but_not_the_format():
    frame = pack({"v": 9, "type": "teleport", "t": tensor_map("i32", (1,))})
    msg = decode(frame, validate=False)
    assert msg["t"].dtype == np.int32
    with pytest.raises(ProtocolError) as caught:
        decode(pack({"v": 9, "t": tensor_map("f64")}), validate=False)
    assert caught.value.code == "bad_dtype"


def test_validate_returns_the_message():
    assert messages.validate(SAMPLES["step"]) is SAMPLES["step"]


def test_error_to_message_is_a_valid_error_message():
    err = ProtocolError("bad_field", "step: field 'hidden' must be f32", "hidden")
    reply = err.to_message()
    assert reply == {"v": 1, "type": "error", "code": "bad_field", "field": "hidden",
                     "message": "step: field 'hidden' must be f32"}
    assert decode(encode(reply)) == reply
    assert decode(encode(ProtocolError("malformed", "junk").to_message()))["field"] is None
    assert "bad_field" in repr(err) and str(err) == err.message


def test_schema_table_is_extensible(monkeypatch):
    schema = messages.MessageSchema("ping", messages.ANY, {
        "seq": int,
        "points": messages.ListOf(messages.Struct({"x": float, "label": messages.opt(str)})),
        "grid": messages.opt(messages.Tensor(("f32",), rank=2)),
    })
    monkeypatch.setitem(messages.MESSAGES, "ping", schema)
    good = make("ping", seq=1, points=[{"x": 1.5}], grid=np.zeros((2, 2), np.float32))
    assert_same(decode(encode(good)), good)
    with pytest.raises(ProtocolError) as caught:
        decode(encode(dict(good, grid=np.zeros(4, np.float32)), validate=False))
    assert (caught.value.code, caught.value.field) == ("bad_field", "grid")
    assert "rank 2" in caught.value.message
    with pytest.raises(ProtocolError) as caught:
        messages.validate(dict(good, points=[{"x": 1.0, "label": 3}]))
    assert caught.value.field == "points.0.label"


def test_limits_refuse_unknown_dtype_names():
    with pytest.raises(ValueError):
        Limits(allowed_dtypes=frozenset({"f64"}))


# ---------------------------------------------------------------------------------------------
# Zero copy: encode_parts hands out views of the caller's buffers, and the reader decodes big
# frames into views of the frame


def big_f32(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(count, dtype=np.float32)


BIG = big_f32(wire.ZERO_COPY_MIN_BYTES // 4 + 1000)  # one such tensor makes a big frame


def frame_bytes_view(frame) -> np.ndarray:
    return np.frombuffer(frame, np.uint8)


@pytest.mark.parametrize("msg", [
    *SAMPLES.values(),
    make("step_result", step_id=1, epoch=0, output=BIG, topk_ids=np.arange(8, dtype=np.int32)),
    make("step_result", step_id=1, epoch=0, output=BIG.reshape(-1, 8)[:, ::2]),   # strided
    make("step_result", step_id=1, epoch=0, output=BIG.astype(">f4")),            # big-endian
    make("weights_chunk", chunk_id=0, name="n", offset=0, total=1, sha256="", data=bytes(70000)),
    make("weights_chunk", chunk_id=0, name="n", offset=0, total=1, sha256="",
         data=memoryview(bytearray(70000))),
    make("heartbeat", seq=1, a=BIG[:20000], b=bytes(65536), c=[BIG[:20000]], d=BIG[:3]),
], ids=[*SAMPLES, "big_tensor", "strided", "big_endian", "big_bytes", "big_memoryview", "mixed"])
def test_encode_parts_join_to_encode(msg):
    parts = wire.encode_parts(msg, validate=False)
    assert b"".join(parts) == encode(msg, validate=False)
    assert all(type(part) in (bytes, memoryview) and len(part) for part in parts)


def test_encode_parts_of_a_small_message_is_one_bytes():
    assert wire.encode_parts(SAMPLES["step"]) == [encode(SAMPLES["step"])]


def test_encode_parts_keep_big_buffers_as_views_of_the_callers_arrays():
    data = bytearray(70000)
    msg = make("heartbeat", seq=1, big=BIG, data=data, nested=[BIG[:20000]], small=BIG[:10])
    parts = wire.encode_parts(msg)
    views = [part for part in parts if type(part) is memoryview]
    assert len(views) == 2  # top-level only: nested tensors go through the Packer (copied)
    assert np.shares_memory(np.asarray(views[0]), BIG) and views[0].nbytes == BIG.nbytes
    assert np.shares_memory(np.asarray(views[1]), np.frombuffer(data, np.uint8))
    data[0] = 7  # documented: the pieces see the caller's later changes until they are sent
    assert views[1][0] == 7


def test_encode_parts_views_a_converted_copy_of_a_non_native_array():
    big_endian = BIG.astype(">f4")
    parts = wire.encode_parts(make("step_result", step_id=1, epoch=0, output=big_endian))
    view = next(part for part in parts if type(part) is memoryview)
    assert not np.shares_memory(np.asarray(view), big_endian)
    assert np.array_equal(np.frombuffer(view, "<f4"), BIG)


def big_frame_message() -> dict:
    return make("step_result", step_id=300, epoch=2, output=BIG.reshape(-1, 8),
                topk_ids=np.array([[5, 7]], np.int32), extra={"blob": bytes(70000), "tag": b"t"})


def test_big_frame_decodes_into_views_of_the_frame():
    msg = big_frame_message()
    frame = encode(msg)
    assert len(frame) >= wire.ZERO_COPY_MIN_BYTES
    decoded = decode(frame)
    assert_same(decoded, msg)
    output = decoded["output"]
    assert np.shares_memory(output, frame_bytes_view(frame))  # not one byte of it copied
    assert not output.flags.writeable and not output.flags.owndata
    blob = decoded["extra"]["blob"]
    assert type(blob) is memoryview and blob.readonly and blob.obj is frame
    # Small values are copies: a kept topk must not keep a 4 MB frame alive.
    assert not np.shares_memory(decoded["topk_ids"], frame_bytes_view(frame))
    assert type(decoded["extra"]["tag"]) is bytes


def test_small_frames_go_through_the_c_unpacker_unless_asked(monkeypatch):
    monkeypatch.setattr(wire, "ZERO_COPY_MIN_BYTES", 1 << 20)
    msg = make("step_result", step_id=1, epoch=0, output=big_f32(200_000))
    frame = encode(msg)
    assert wire.SPLICE_MIN_BYTES < len(frame) < wire.ZERO_COPY_MIN_BYTES
    assert not np.shares_memory(decode(frame)["output"], frame_bytes_view(frame))
    assert np.shares_memory(decode(frame, zero_copy=True)["output"], frame_bytes_view(frame))
    big_frame = encode(big_frame_message())
    assert not np.shares_memory(decode(big_frame, zero_copy=False)["output"],
                                frame_bytes_view(big_frame))


def test_zero_copy_views_of_a_bytearray_frame_are_read_only():
    frame = bytearray(encode(big_frame_message()))
    output = decode(frame)["output"]
    assert np.shares_memory(output, frame_bytes_view(frame)) and not output.flags.writeable
    assert_same(decode(memoryview(frame)[:]), big_frame_message())


def test_reader_hands_frames_of_many_small_items_to_c(monkeypatch):
    msg = make("ready", layers=list(range(2_000)), checksum="x")
    frame = encode(msg)
    with pytest.raises(msgpack_reader.TooManyItems):
        msgpack_reader.read_msgpack(memoryview(frame), DEFAULT_LIMITS, max_items=1_000)
    assert msgpack_reader.read_msgpack(memoryview(frame), DEFAULT_LIMITS, max_items=2_010) == msgpack.unpackb(frame)
    c_unpackb, calls = msgpack.unpackb, []
    monkeypatch.setattr(msgpack, "unpackb", lambda *args, **kwargs: calls.append(1) or c_unpackb(
        *args, **kwargs))
    assert_same(decode(frame, zero_copy=True), msg)
    assert calls == [1]


def test_reader_and_c_agree_past_msgpacks_stack_limit():
    # Limits refuses a max_depth this deep (decode's tree walk would exhaust Python's stack);
    # this test compares only the two unpackers, so it sets the field past the check
    limits = Limits()
    object.__setattr__(limits, "max_depth", 2000)
    for frame in (b"\x91" * 1023 + b"\x90", b"\x91" * 1024 + b"\x90", b"\x91" * 1024 + b"\x01"):
        # _decode_tree can't walk 1024 levels under Python's recursion limit, so compare what
        # each unpacker itself returns or raises.
        outcomes = set()
        for unpack in (lambda: wire._unpack_copying(frame, limits),
                       lambda: msgpack_reader.read_msgpack(memoryview(frame), limits, max_items=1 << 20)):
            try:
                value = unpack()
                depth = 0
                while type(value) is list and value:
                    value, depth = value[0], depth + 1
                outcomes.add(("ok", depth, repr(value)))
            except ProtocolError as err:
                outcomes.add((err.code, err.field))
        assert len(outcomes) == 1, (frame[-2:], outcomes)


# Hand-made frames at the edges of the msgpack format and the limits. Each must get the same
# outcome from both decoders (the message decoded, or the same error code and field).
def raw_map(*pairs: bytes) -> bytes:
    assert len(pairs) % 2 == 0
    return bytes([0x80 | len(pairs) // 2]) + b"".join(pairs)


HB_HEAD = b"\xa1v\x01\xa4type\xa9heartbeat\xa3seq\x01"
EDGE_FRAMES = {
    "ints_every_width": b"\x84" + HB_HEAD + b"\xa1x\x9b\x00\x7f\xe0\xcc\xff\xcd\xff\xff"
                        b"\xce\xff\xff\xff\xff\xcf" + b"\xff" * 8 + b"\xd0\x80\xd1\x80\x00"
                        b"\xd2\x80\x00\x00\x00\xd3\x80" + b"\x00" * 7,
    "non_minimal_forms": b"\xde\x00\x04" + HB_HEAD + b"\xd9\x01x\xdd\x00\x00\x00\x02\xda\x00\x01a"
                         b"\xdb\x00\x00\x00\x01b",
    "floats": b"\x84" + HB_HEAD + b"\xa1x\x93\xca\x3f\xc0\x00\x00\xcb\x3f\xf8" + bytes(6)
              + b"\xca\x7f\xa0\x00\x01",
    "bins_every_width": b"\x84" + HB_HEAD + b"\xa1x\x93\xc4\x01a\xc5\x00\x01b\xc6\x00\x00\x00\x01c",
    "tensor_in_bin16": b"\x84" + HB_HEAD + b"\xa1t\x83\xa3__t\xa2u8\xa1s\x91\x02\xa1b\xc5\x00\x02ab",
    "tensor_in_str": b"\x84" + HB_HEAD + b"\xa1t\x83\xa3__t\xa2u8\xa1s\x91\x02\xa1b\xa2ab",
    "tensor_keys_reordered": b"\x84" + HB_HEAD + b"\xa1t\x83\xa1b\xc4\x02ab\xa1s\x91\x02\xa3__t\xa2u8",
    "duplicate_keys": b"\x84" + HB_HEAD + b"\xa3seq\x02",
    "reserved_c1": b"\x84" + HB_HEAD + b"\xa1x\xc1",
    "bin_key": b"\x84" + HB_HEAD + b"\xc4\x01k\x01",
    "int_key_then_truncated_value": b"\x84" + HB_HEAD + b"\x01\xd9\x05abc",
    "int_key_then_too_long_str": b"\x84" + HB_HEAD + b"\x01\xa5abcde",
    "map_key": b"\x84" + HB_HEAD + b"\x80\x01",
    "nil_key": b"\x84" + HB_HEAD + b"\xc0\x01",
    "str_too_long_but_truncated": b"\x84" + HB_HEAD + b"\xa1x\xa5abc",
    "list_too_long_but_truncated": b"\x84" + HB_HEAD + b"\xa1x\xdc\x00\x09",
    "invalid_utf8_key": b"\x84" + HB_HEAD + b"\xa2\xc3\x28\x01",
    "utf8_surrogate": b"\x84" + HB_HEAD + b"\xa1x\xa3\xed\xa0\x80",
    "timestamp32": b"\x84" + HB_HEAD + b"\xa1x\xd6\xff\x00\x00\x00\x01",
    "timestamp64_bad_nanoseconds": b"\x84" + HB_HEAD + b"\xa1x\xd7\xff" + b"\xff" * 8,
    "timestamp96": b"\x84" + HB_HEAD + b"\xa1x\xc7\x0c\xff" + bytes(12),
    "timestamp_bad_length": b"\x84" + HB_HEAD + b"\xa1x\xd5\xff\x00\x00",
    "timestamp_as_key": b"\x84" + HB_HEAD + b"\xd6\xff\x00\x00\x00\x01\x01",
    "ext_positive": b"\x84" + HB_HEAD + b"\xa1x\xd4\x05\x00",
    "ext_empty": b"\x84" + HB_HEAD + b"\xa1x\xc7\x00\x05",
    "ext_truncated": b"\x84" + HB_HEAD + b"\xa1x\xc8\x00\x05\x05ab",
    "header_truncated": b"\x84" + HB_HEAD + b"\xa1x\xcd\x01",
    "length_truncated": b"\x84" + HB_HEAD + b"\xa1x\xdb\x00\x00",
    "empty_containers": b"\x86" + HB_HEAD + b"\xa1x\x90\xa1y\x80\xa1z\xdc\x00\x00",
    "scalar_top_level": b"\x01",
    "nil_top_level": b"\xc0",
    "trailing_after_map": b"\x83" + HB_HEAD + b"\xc0",
    "deep_within_limit": b"\x84" + HB_HEAD + b"\xa1x" + b"\x91" * 15 + b"\x01",
    "deep_beyond_limit": b"\x84" + HB_HEAD + b"\xa1x" + b"\x91" * 16 + b"\x01",
    "deep_then_truncated": b"\x84" + HB_HEAD + b"\xa1x" + b"\x91" * 30,
}


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


@pytest.mark.parametrize("frame", EDGE_FRAMES.values(), ids=EDGE_FRAMES)
@pytest.mark.parametrize("limits", [DEFAULT_LIMITS, Limits(max_str_len=3, max_list_len=2)],
                         ids=["default_limits", "small_limits"])
def test_decoders_agree_on_edge_frames(frame, limits):
    for validate in (True, False):
        assert outcome(frame, True, limits, validate) == outcome(frame, False, limits, validate)


def test_edge_frames_decode_as_expected():
    decoded = decode(EDGE_FRAMES["ints_every_width"], zero_copy=True)
    assert decoded["x"] == [0, 127, -32, 255, 65535, 2**32 - 1, 2**64 - 1, -128, -32768, -2**31,
                            -2**63]
    assert decode(EDGE_FRAMES["floats"], zero_copy=True)["x"][:2] == [1.5, 1.5]
    assert decode(EDGE_FRAMES["duplicate_keys"], zero_copy=True)["seq"] == 2
    assert decode(EDGE_FRAMES["tensor_keys_reordered"], zero_copy=True)["t"].tolist() == [97, 98]


# ---------------------------------------------------------------------------------------------
# Property tests: decode raises ProtocolError and nothing else, for any bytes

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_or_protocol_error(data: bytes, **kwargs):
    try:
        result = decode(data, **kwargs)
    except ProtocolError as err:
        assert err.code and isinstance(err.message, str)
        return None
    assert isinstance(result, dict)
    return result


@FUZZ
@given(st.binary(max_size=512))
def test_decode_arbitrary_bytes_raises_only_protocol_error(data):
    decode_or_protocol_error(data)
    decode_or_protocol_error(data, validate=False)
    decode_or_protocol_error(b"\x83\xa1v\x01\xa4type\xa9heartbeat" + data)  # get past the header


MUTABLE_FRAMES = [encode(msg) for name, msg in sorted(SAMPLES.items()) if name != "weights_chunk"]


@FUZZ
@given(st.sampled_from(MUTABLE_FRAMES), st.data())
def test_decode_mutated_frames_raises_only_protocol_error(frame, data):
    frame = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "truncate"]))
        at = data.draw(st.integers(0, max(len(frame) - 1, 0)))
        if kind == "flip" and frame:
            frame[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and frame:
            frame[at] = data.draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC1, 0xC6, 0xCF, 0xD9, 0xDC,
                                                   0xDF, 0xFF, 0x90, 0xA3]))
        elif kind == "cut":
            del frame[at:at + data.draw(st.integers(1, 8))]
        elif kind == "insert":
            frame[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del frame[at:]
    decode_or_protocol_error(bytes(frame))
    decode_or_protocol_error(bytes(frame), validate=False)


native_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8).filter(lambda k: k != "__t"), children, max_size=4),
    max_leaves=20)


def nesting(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(nesting, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(nesting, value), default=0)
    return 0


@FUZZ
@given(native_values)
def test_any_native_extra_field_round_trips(value):
    assume(nesting(value) < DEFAULT_LIMITS.max_depth)
    msg = make("heartbeat", seq=1, extra=value)
    assert_same(decode(encode(msg)), msg)


# ---------------------------------------------------------------------------------------------
# The decoders agree: the same messages from valid frames, the same errors from any other bytes


@FUZZ
@given(native_values, st.sampled_from([(), (0,), (3,), (2, 5)]), st.sampled_from(sorted(NUMPY_DTYPES)))
def test_decoders_agree_on_valid_messages(value, shape, dtype):
    assume(nesting(value) < DEFAULT_LIMITS.max_depth - 1)
    msg = make("heartbeat", seq=1, extra=value, t=[sample_array(dtype, shape), {"u": value}])
    frame = encode(msg)
    assert outcome(frame, True) == outcome(frame, False) == ("ok", comparable(decode(frame)))
    assert_same(decode(frame, zero_copy=True), msg)


def pack_length(small_head: int | None, heads: tuple[int, int, int], length: int, form: int) -> bytes:
    """A msgpack header for ``length``: its fix form (if any and it fits) or a wider one: msgpack
    allows non-minimal forms, and the decoders must accept them alike."""
    candidates = []
    if small_head is not None and length < (16 if small_head in (0x80, 0x90) else 32):
        candidates.append(bytes([small_head | length]))
    for head, fmt, limit in zip(heads, (">B", ">H", ">I"), (1 << 8, 1 << 16, 1 << 32)):
        if head is not None and length < limit:
            candidates.append(bytes([head]) + struct.pack(fmt, length))
    return candidates[min(form, len(candidates) - 1)]


def raw_int(head_and_format: tuple[int, str]):
    head, fmt = head_and_format
    bits = 8 * struct.calcsize(fmt)
    low, high = (0, 2 ** bits - 1) if fmt.isupper() else (-2 ** (bits - 1), 2 ** (bits - 1) - 1)
    return st.integers(low, high).map(lambda i: bytes([head]) + struct.pack(">" + fmt, i))


FIXEXT_HEADS = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}


def raw_ext(code: int, length: int, fixed: bool) -> bytes:
    head = bytes([FIXEXT_HEADS[length]]) if fixed and length in FIXEXT_HEADS else bytes([0xC7, length])
    return head + struct.pack(">b", code) + bytes(range(length))


def raw_tensor(dtype: str, shape: list, length_error: int, form: int) -> bytes:
    """A tensor map, its byte count off by ``length_error`` itemsizes (0: a valid one)."""
    itemsize = 8 if dtype in ("f64", "i64") else 4 if dtype == "f32" else 1
    data = bytes(max(0, math.prod(shape) + length_error) * itemsize)
    return (b"\x83\xa3__t" + bytes([0xA0 | len(dtype)]) + dtype.encode() + b"\xa1s"
            + bytes([0x90 | len(shape)]) + bytes(shape) + b"\xa1b"
            + pack_length(None, (0xC4, 0xC5, 0xC6), len(data), form) + data)


forms = st.integers(0, 3)
valid_scalars = st.one_of(
    st.integers(-32, 127).map(lambda i: struct.pack(">b" if i < 0 else ">B", i)),  # fixint
    st.sampled_from([b"\xc0", b"\xc2", b"\xc3"]),                                 # nil, bools
    st.sampled_from(list(zip(range(0xCC, 0xD4), "BHIQbhiq"))).flatmap(raw_int),
    st.binary(min_size=4, max_size=4).map(lambda bits: b"\xca" + bits),              # any float32
    st.binary(min_size=8, max_size=8).map(lambda bits: b"\xcb" + bits),
    st.builds(lambda data, form: pack_length(0xA0, (0xD9, 0xDA, 0xDB), len(data), form) + data,
              st.text(max_size=12).map(str.encode), forms),
    st.builds(lambda data, form: pack_length(None, (0xC4, 0xC5, 0xC6), len(data), form) + data,
              st.binary(max_size=6), forms),
    st.builds(raw_tensor, st.sampled_from(["f32", "u8"]), st.lists(st.integers(0, 3), max_size=2),
              st.just(0), forms),
)
faulty_scalars = st.one_of(
    st.just(b"\xc1"),                                                                # never used
    st.builds(lambda data: bytes([0xA0 | len(data)]) + data, st.binary(max_size=6)),  # maybe not UTF-8
    st.builds(raw_ext, st.sampled_from([-1, -1, 0, 5, -128, 127]),
              st.sampled_from([0, 1, 2, 4, 8, 12, 16]), st.booleans()),
    st.builds(raw_tensor, st.sampled_from(["f32", "u8", "f64", "i64"]),
              st.lists(st.integers(0, 3), max_size=2), st.integers(-1, 1), forms),
)
raw_scalars = st.one_of(valid_scalars, valid_scalars, valid_scalars, faulty_scalars)
str_keys = st.sampled_from(["v", "type", "seq", "x", "__t", "s", "b", "é"]).map(
    lambda key: pack_length(0xA0, (0xD9, 0xDA, 0xDB), len(key.encode()), 0) + key.encode())
raw_values = st.recursive(raw_scalars, lambda children: st.one_of(
    st.tuples(st.lists(children, max_size=4), forms).map(
        lambda t: pack_length(0x90, (None, 0xDC, 0xDD), len(t[0]), t[1]) + b"".join(t[0])),
    st.tuples(st.lists(st.tuples(st.one_of(str_keys, str_keys, str_keys, children), children),
                       max_size=4), forms).map(
        lambda t: pack_length(0x80, (None, 0xDE, 0xDF), len(t[0]), t[1])
        + b"".join(key + value for key, value in t[0]))), max_leaves=12)
# Tight enough for generated values to cross them, loose enough for the frame's "v" and "type".
small_limits = st.builds(Limits, max_tensor_elements=st.integers(0, 8),
                         allowed_dtypes=st.sets(st.sampled_from(sorted(wire.DTYPES))).map(frozenset),
                         max_depth=st.integers(2, 6), max_list_len=st.integers(3, 7),
                         max_str_len=st.integers(9, 12))


@FUZZ
@given(st.lists(st.tuples(st.one_of(str_keys, str_keys, str_keys, raw_values), raw_values),
                max_size=5), st.integers(0, 2),
       st.sampled_from(["whole", "whole", "whole", "cut", "trailing"]), st.integers(1, 3),
       small_limits | st.just(DEFAULT_LIMITS))
def test_decoders_agree_on_raw_msgpack(fields, header_form, ending, count, limits):
    """Frames built byte by byte, with every msgpack type and header form, good and bad keys,
    ext types, tensor maps right and wrong, truncated or with trailing bytes, under tight limits."""
    frame = (pack_length(0x80, (None, 0xDE, 0xDF), len(fields) + 2, header_form)
             + b"\xa1v\x01\xa4type\xa9heartbeat" + b"".join(key + value for key, value in fields))
    if ending == "cut":
        frame = frame[:-count]
    elif ending == "trailing":
        frame += bytes(count)
    for validate in (True, False):
        assert outcome(frame, True, limits, validate) == outcome(frame, False, limits, validate)


tensor_like_maps = st.fixed_dictionaries(
    {"__t": st.sampled_from(["f32", "u8", "i64", "f64", 7]),
     "s": st.lists(st.integers(-1, 3), max_size=3) | st.integers(0, 3),
     "b": st.binary(max_size=24) | st.text(max_size=3)},
    optional={"x": st.none()})
packed_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.floats()
    | st.text(max_size=14) | st.binary(max_size=8) | tensor_like_maps,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=4) | st.binary(max_size=2) | st.integers(0, 2), children,
                      max_size=5),
    max_leaves=16)


@FUZZ
@given(packed_values, st.one_of(st.just(DEFAULT_LIMITS), st.just(DEFAULT_LIMITS), small_limits))
def test_decoders_agree_on_packed_values(value, limits):
    """Valid msgpack, built by msgpack itself, that the message layer may refuse: tensor maps right
    and wrong, bin and int keys, deep nesting, under tight limits."""
    frame = msgpack.packb({"v": 1, "type": "heartbeat", "seq": 1, "x": value})
    for validate in (True, False):
        assert outcome(frame, True, limits, validate) == outcome(frame, False, limits, validate)


@FUZZ
@given(st.binary(max_size=512))
def test_decoders_agree_on_arbitrary_bytes(data):
    for frame in (data, b"\x83\xa1v\x01\xa4type\xa9heartbeat" + data):
        assert outcome(frame, True, validate=False) == outcome(frame, False, validate=False)


# and one with a bin big enough to come back as a view
AGREEMENT_FRAMES = MUTABLE_FRAMES + [encode(make("weights_chunk", chunk_id=1, name="n", offset=0,
                                                 total=9, data=bytes(range(256)) * 300, sha256="ab"))]


@FUZZ
@given(st.sampled_from(AGREEMENT_FRAMES), st.data())
def test_decoders_agree_on_mutated_frames(frame, data):
    frame = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "truncate"]))
        # Half of the mutations hit the first bytes, where the headers are.
        at = data.draw(st.integers(0, max(min(len(frame), 96) - 1, 0))
                       | st.integers(0, max(len(frame) - 1, 0)))
        if kind == "flip" and frame:
            frame[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and frame:
            frame[at] = data.draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC1, 0xC6, 0xCF, 0xD9, 0xDC,
                                                   0xDF, 0xFF, 0x90, 0xA3, 0xC0, 0xD6, 0xC5]))
        elif kind == "cut":
            del frame[at:at + data.draw(st.integers(1, 8))]
        elif kind == "insert":
            frame[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del frame[at:]
    frame = bytes(frame)
    for validate in (True, False):
        assert outcome(frame, True, validate=validate) == outcome(frame, False, validate=validate)


# ---------------------------------------------------------------------------------------------
# Golden vectors: the bytes both the Python and the JS codec must produce and accept.
# index.json describes each message as JSON: a tensor is {"$tensor": {"dtype", "shape",
# "values"}} (values flat, C order), bytes are {"$bytes": "<hex>"}.


def to_json(value):
    if isinstance(value, np.ndarray):
        return {"$tensor": {"dtype": format.wire_name(value.dtype), "shape": list(value.shape),
                            "values": value.reshape(-1).tolist()}}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    return value


def from_json(value):
    if isinstance(value, dict):
        if set(value) == {"$tensor"}:
            spec = value["$tensor"]
            return np.array(spec["values"], wire.DTYPES[spec["dtype"]]).reshape(spec["shape"])
        if set(value) == {"$bytes"}:
            return bytes.fromhex(value["$bytes"])
        return {key: from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_json(item) for item in value]
    return value


def vector_definitions():
    """(name, description, message) for frames that must decode; (name, description, frame,
    code, field) for frames that must be refused."""
    every_dtype = [sample_array(name, shape)
                   for name in sorted(NUMPY_DTYPES) for shape in [(), (0,), (2, 3)]]
    valid = [
        ("heartbeat", "the smallest useful message", make("heartbeat", seq=7)),
        ("hello", "nested maps, optional field present", SAMPLES["hello"]),
        ("welcome", "ints of several sizes", make("welcome", worker_id="w7", heartbeat_ms=1000,
                                                  epoch=70000)),
        ("step", "hidden state f32 [2, 4] and a list of session maps",
         make("step", step_id=9, epoch=2,
              sessions=[{"session_id": "s1", "start_pos": 0, "length": 1},
                        {"session_id": "s2", "start_pos": 300, "length": 1}],
              hidden=f32(0.5, -1.25, 3.0, 1e-3, -0.0, 65504.0, 1.5e-7, 2.0, shape=(2, 4)),
              want_topk=2)),
        ("step_speculative", "a session's last token and 2 drafts: top-k of its 3 last rows",
         make("step", step_id=10, epoch=2,
              sessions=[{"session_id": "s1", "start_pos": 40, "length": 3, "topk_rows": 3}],
              hidden=f32(0.25, -0.5, 1.0, 2.5, -3.0, 0.125, shape=(3, 2)), want_topk=1)),
        ("truncate_session", "rejected drafts rolled back: the KV keeps positions [0, 41)",
         make("truncate_session", session_id="s1", length=41)),
        ("step_result", "f16 output, i32 ids, f32 logits, float field",
         make("step_result", step_id=9, epoch=2,
              output=np.array([[0.5, -2.25, 1024.0], [0.0, 6.1035e-05, -65504.0]], np.float16),
              topk_ids=np.array([[7, 49151]], np.int32), topk_logits=f32(12.5, -3.75, shape=(1, 2)),
              compute_ms=0.625)),
        ("weights_chunk", "bytes field of 300 bytes (bin16 header)",
         make("weights_chunk", chunk_id=3, name="blk.0.attn_q.weight", offset=600, total=900,
              data=bytes(range(256)) + bytes(44), sha256="ab" * 32)),
        ("generate", "client request: str, list of maps, floats, bools, nil-free",
         make("generate", request_id="r-1", messages=[{"role": "user", "content": "Grüß dich 👋"}],
              max_tokens=32, temperature=0.7, top_p=0.95, top_k=40, seed=-1, greedy=False)),
        ("token", "one streamed token", make("token", request_id="r-1", index=0, token_id=2,
                                             text="Hello")),
        ("error", "error with nil field", ProtocolError("malformed", "junk").to_message()),
        ("tensors_every_dtype", "a 0-d, an empty and a [2, 3] tensor of every dtype, in a list",
         make("heartbeat", seq=1, tensors=every_dtype)),
        ("extra_fields", "unknown fields pass through; u8 tensor of 300 bytes (bin16)",
         make("heartbeat", seq=2, load={"queue": 3, "ratio": 0.5, "tags": ["a", None, True]},
              future_field=sample_array("u8", (300,)))),
    ]
    tensor_bytes = b"\x00\x00\x80\x3f"
    invalid = [
        ("bad_version", "v is 2", pack({"v": 2, "type": "heartbeat", "seq": 1}),
         "version_mismatch", "v"),
        ("unknown_type", "type not in the table", pack({"v": 1, "type": "teleport"}),
         "unknown_type", "type"),
        ("missing_field", "heartbeat without seq", pack({"v": 1, "type": "heartbeat"}),
         "bad_field", "seq"),
        ("wrong_field_type", "session length is a str",
         pack(make("step", step_id=1, epoch=0,
                   sessions=[{"session_id": "a", "start_pos": 0, "length": "1"}],
                   hidden={"__t": "f32", "s": [1], "b": tensor_bytes})),
         "bad_field", "sessions.0.length"),
        ("tensor_f64", "f64 tensors are refused",
         pack(hb(t={"__t": "f64", "s": [1], "b": bytes(8)})), "bad_dtype", "t"),
        ("tensor_length_mismatch", "shape [2] f32 needs 8 bytes, has 4",
         pack(hb(t={"__t": "f32", "s": [2], "b": tensor_bytes})), "bad_shape", "t"),
        ("tensor_negative_shape", "shape [-1]",
         pack(hb(t={"__t": "f32", "s": [-1], "b": tensor_bytes})), "bad_shape", "t"),
        ("top_level_array", "a message must be a map", pack([1, "heartbeat"]), "malformed", None),
        ("truncated", "heartbeat frame cut short", pack(make("heartbeat", seq=7))[:-1],
         "malformed", None),
        ("trailing_bytes", "one byte after the map", pack(make("heartbeat", seq=7)) + b"\xc0",
         "malformed", None),
        ("ext_type", "msgpack ext types are not part of the protocol",
         pack(hb(x=msgpack.ExtType(1, b"\x00"))), "malformed", None),
        # values a hostile tab sent (issue 16): each type-correct or storable, each refused
        ("calibration_nan", "step_ms NaN: floats are finite",
         pack(make("calibration_result", step_ms=float("nan"))), "bad_field", "step_ms"),
        ("calibration_inf", "step_ms inf", pack(make("calibration_result", step_ms=float("inf"))),
         "bad_field", "step_ms"),
        ("calibration_negative", "step_ms below its range",
         pack(make("calibration_result", step_ms=-1.0)), "bad_field", "step_ms"),
        ("hello_memory_str", "capabilities.memory_bytes a str",
         pack(make("hello", worker_name="t", capabilities={"memory_bytes": "lots"})),
         "bad_field", "capabilities.memory_bytes"),
        ("hello_memory_negative", "capabilities.memory_bytes below its range",
         pack(make("hello", worker_name="t", capabilities={"memory_bytes": -1})),
         "bad_field", "capabilities.memory_bytes"),
        ("hello_expansion_nan", "capabilities.expansion NaN",
         pack(make("hello", worker_name="t", capabilities={"expansion": float("nan")})),
         "bad_field", "capabilities.expansion"),
        ("hello_name_too_long", "worker_name of 129 characters (stored strings are bounded)",
         pack(make("hello", worker_name="é" * 129, capabilities={})), "bad_field", "worker_name"),
        ("hello_capabilities_too_big", "capabilities over 16 KiB (stored maps are bounded)",
         pack(make("hello", worker_name="t", capabilities={"junk": "x" * 20_000})),
         "bad_field", "capabilities"),
        ("generate_request_id_too_long", "a client's request_id over 128 characters",
         pack(make("generate", request_id="r" * 129, prompt="hi")), "bad_field", "request_id"),
    ]
    return valid, invalid


def build_vectors() -> tuple[dict, dict[str, bytes]]:
    valid, invalid = vector_definitions()
    files: dict[str, bytes] = {}
    index = {
        "protocol_version": wire.PROTOCOL_VERSION,
        "about": "Frames of the tabshard wire format (protocol/wire.py). For each 'valid' entry, "
                 "encoding 'message' must give exactly the bytes of 'file', and decoding the file "
                 "must give 'message'. Each 'invalid' file must be refused with 'error'. In "
                 "'message', {\"$tensor\": {dtype, shape, values}} is a tensor (values flat, C "
                 "order) and {\"$bytes\": hex} a bin. Map keys are in encoding order. Float fields "
                 "hold non-integral values so that JS encodes them as float64, as Python does.",
        "valid": [],
        "invalid": [],
    }
    for name, description, msg in valid:
        files[f"{name}.msgpack"] = encode(msg)
        index["valid"].append({"file": f"{name}.msgpack", "description": description,
                               "message": to_json(msg)})
    for name, description, frame, code, field in invalid:
        files[f"invalid_{name}.msgpack"] = frame
        index["invalid"].append({"file": f"invalid_{name}.msgpack", "description": description,
                                 "error": {"code": code, "field": field}})
    return index, files


def index_json_text(index: dict) -> str:
    return json.dumps(index, indent=1, ensure_ascii=False) + "\n"


def write_vectors() -> None:
    index, files = build_vectors()
    VECTORS_DIR.mkdir(exist_ok=True)
    for name, frame in files.items():
        (VECTORS_DIR / name).write_bytes(frame)
    (VECTORS_DIR / "index.json").write_text(index_json_text(index), encoding="utf-8")
    print(f"wrote {len(files)} vectors to {VECTORS_DIR}")


def load_index() -> dict:
    return json.loads((VECTORS_DIR / "index.json").read_text(encoding="utf-8"))


def test_vector_files_match_the_definitions():
    index, files = build_vectors()
    assert load_index() == json.loads(index_json_text(index))
    on_disk = {path.name for path in VECTORS_DIR.glob("*.msgpack")}
    assert on_disk == set(files)
    for name, frame in files.items():
        assert (VECTORS_DIR / name).read_bytes() == frame, name


@pytest.mark.parametrize("entry", load_index()["valid"] if (VECTORS_DIR / "index.json").exists()
                         else [], ids=lambda entry: entry["file"])
def test_golden_vector_valid(entry):
    frame = (VECTORS_DIR / entry["file"]).read_bytes()
    msg = from_json(entry["message"])
    assert encode(msg) == frame                # byte for byte
    assert_same(decode(frame), msg)


@pytest.mark.parametrize("entry", load_index()["invalid"] if (VECTORS_DIR / "index.json").exists()
                         else [], ids=lambda entry: entry["file"])
def test_golden_vector_invalid(entry):
    frame = (VECTORS_DIR / entry["file"]).read_bytes()
    with pytest.raises(ProtocolError) as caught:
        decode(frame)
    assert {"code": caught.value.code, "field": caught.value.field} == entry["error"]


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-vectors"]:
        write_vectors()
    else:
        sys.exit(f"usage: {sys.argv[0]} --write-vectors   (tests run under pytest)")


def test_limits_refuse_a_depth_the_tree_walk_cannot_honour():
    with pytest.raises(ValueError, match="max_depth"):
        Limits(max_depth=2000)

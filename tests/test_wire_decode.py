"""protocol/wire.py's decode: bad input becomes a ProtocolError with the right code and field; big
frames decode into views of the frame (zero copy); both decoders agree on hand-made frames at
the edges of the msgpack format and the limits.
"""
from __future__ import annotations


import msgpack
import numpy as np
import pytest

from protocol import messages, msgpack_reader, wire
from protocol.format import DEFAULT_LIMITS, Limits, ProtocolError
from protocol.wire import decode, encode, make
from tests.wire_samples import SAMPLES, assert_same, hb, outcome, pack, tensor_map
from tests.wire_samples import decoder  # noqa: F401 (autouse: every test here runs once per decoder)


# ---------------------------------------------------------------------------------------------
# Decode refuses bad input with the right code and field


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
    ("float_as_str", pack(make("measurement", step_ms="3")), None, "bad_field", "step_ms"),
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

"""protocol/wire.py: every message type round-trips, tensors of every dtype and shape, what encode
refuses. Each test runs once per decoder (tests/wire_samples.py's fixture `decoder`).
"""
from __future__ import annotations


import msgpack
import numpy as np
import pytest

from protocol import messages, wire
from protocol.format import Limits, ProtocolError
from protocol.wire import decode, encode, make
from tests.wire_samples import NUMPY_DTYPES, SAMPLES, assert_same, f32, sample_array
from tests.wire_samples import decoder  # noqa: F401 (autouse: every test here runs once per decoder)


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
    assert decode(encode(make("measurement", step_ms=2)))["step_ms"] == 2


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


def test_limits_refuse_a_depth_the_tree_walk_cannot_honour():
    with pytest.raises(ValueError, match="max_depth"):
        Limits(max_depth=2000)

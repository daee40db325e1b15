"""Property tests of protocol/wire.py: decode raises ProtocolError and nothing else for any bytes,
and the two decoders (C unpacker, zero-copy reader) return the same messages and the same errors.
"""
from __future__ import annotations

import math
import os
import struct

import msgpack
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from protocol import wire
from protocol.format import DEFAULT_LIMITS, Limits, ProtocolError
from protocol.wire import decode, encode, make
from tests.wire_samples import NUMPY_DTYPES, SAMPLES, assert_same, comparable, outcome, sample_array
from tests.wire_samples import decoder  # noqa: F401 (autouse: every test here runs once per decoder)


# ---------------------------------------------------------------------------------------------
# Property tests: decode raises ProtocolError and nothing else, for any bytes

# `make test-fast` (the inner loop) draws fewer examples; `make test` the full 400
FUZZ = settings(max_examples=int(os.environ.get("TABSHARD_FUZZ_EXAMPLES", "400")), deadline=None, suppress_health_check=[HealthCheck.too_slow])


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


SET_BYTES = [0x00, 0x7F, 0x80, 0xC1, 0xC6, 0xCF, 0xD9, 0xDC, 0xDF, 0xFF, 0x90, 0xA3, 0xC0, 0xD6, 0xC5]


def mutate(frame: bytes, data, positions) -> bytes:
    """1-4 mutations of a frame (flip a bit, set a byte to a msgpack marker, cut, insert, truncate)
    at positions drawn from `positions(frame as it is now)`."""
    frame = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "truncate"]))
        at = data.draw(positions(frame))
        if kind == "flip" and frame:
            frame[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and frame:
            frame[at] = data.draw(st.sampled_from(SET_BYTES))
        elif kind == "cut":
            del frame[at:at + data.draw(st.integers(1, 8))]
        elif kind == "insert":
            frame[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del frame[at:]
    return bytes(frame)


MUTABLE_FRAMES = [encode(msg) for name, msg in sorted(SAMPLES.items()) if name != "weights_chunk"]


@FUZZ
@given(st.sampled_from(MUTABLE_FRAMES), st.data())
def test_decode_mutated_frames_raises_only_protocol_error(frame, data):
    frame = mutate(frame, data, lambda f: st.integers(0, max(len(f) - 1, 0)))
    decode_or_protocol_error(frame)
    decode_or_protocol_error(frame, validate=False)


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
    # half of the mutations hit the first bytes, where the headers are
    frame = mutate(frame, data, lambda f: st.integers(0, max(min(len(f), 96) - 1, 0)) | st.integers(0, max(len(f) - 1, 0)))
    for validate in (True, False):
        assert outcome(frame, True, validate=validate) == outcome(frame, False, validate=validate)

"""The one wire format every tabshard peer speaks: msgpack maps carrying numpy tensors.

Workers (browser tabs, Python tabs), the coordinator and clients exchange WebSocket binary
messages. Each message is ONE msgpack map (plain msgpack: any library, e.g. JS
``@msgpack/msgpack``, reads it) with at least

    "v"     int   protocol version, PROTOCOL_VERSION
    "type"  str   a key of MESSAGES, which lists each type's fields

Byte-level example, ``{"v": 1, "type": "heartbeat", "seq": 7}``::

    83                          map, 3 entries
    a1 76  01                   "v"    -> 1
    a4 74 79 70 65              "type" -> a9 "heartbeat" (68 65 61 72 74 62 65 61 74)
    a3 73 65 71  07             "seq"  -> 7

Tensors (numpy arrays) may appear anywhere in a message: as a field, in a list, in a map. A tensor
is a 3-entry map, in this key order::

    {"__t": dtype name, "s": [shape...], "b": bin: raw little-endian bytes in C order}

so ``np.array([1.0, 2.0], np.float32)`` is::

    83 a3 5f 5f 74 a3 66 33 32      "__t" -> "f32"
       a1 73 91 02                  "s"   -> [2]
       a1 62 c4 08                  "b"   -> bin, 8 bytes:
       00 00 80 3f 00 00 00 40                 1.0f, 2.0f little-endian

Dtype names: f32 f16 i32 u32 u8 i8 i64 (DTYPES). f64 is refused: cast to f32 first, so that a
browser tab never receives a type WebGPU cannot use. A map with a "__t" key is always a tensor;
no other map may carry that key.

Determinism: ``encode`` writes map keys in dict insertion order, integers and bins in their
smallest msgpack form, floats as float64, str as str (never bin) and bytes as bin; ``make`` puts
"v" and "type" first. The same message built the same way gives the same bytes, in Python and in
JS (tests/vectors holds frames both codecs must reproduce). One JS caveat: a JS number with an
integral value (2.0) encodes as an int, so float fields accept ints.

Errors: ``decode`` raises only ``ProtocolError``, whatever the bytes; ``.code`` says what kind:

    malformed          not msgpack, truncated, trailing bytes, non-map top level, non-str map
                       key, ext types, a tensor map with other keys
    frame_too_large    frame longer than Limits.max_frame_bytes (checked before unpacking)
    limit_exceeded     a str, bin, list or map longer than Limits allows
    too_deep           maps/lists nested deeper than Limits.max_depth
    bad_dtype          tensor dtype unknown or not in Limits.allowed_dtypes (also on encode)
    bad_shape          tensor shape not a list of ints >= 0, or byte length != shape x itemsize
    tensor_too_large   more elements than Limits.max_tensor_elements
    version_mismatch   "v" is an int other than PROTOCOL_VERSION
    unknown_type       "type" is not in MESSAGES
    bad_field          a required field missing, or a field of the wrong type

``.field`` is the dotted path of the offending field ("sessions.0.length"), or None.
``ProtocolError.to_message()`` is the "error" message to send back to the peer.

Cost, and who owns the bytes:

  * ``encode_parts`` returns the frame as a list of pieces (bytes and memoryviews) whose
    concatenation is exactly ``encode``'s frame. Top-level tensors and bytes of at least
    SPLICE_MIN_BYTES are pieces of their own: memoryviews of the caller's arrays, not copies
    (tensors nested in lists/maps are copied, through the Packer). The caller must not modify those
    arrays until the pieces have been sent. websockets' ``send(pieces)`` sends them as the
    fragments of one message; the peer receives one frame.
  * ``encode`` joins the pieces into one bytes: one copy of the big buffers.
  * ``decode`` of a frame of at least ZERO_COPY_MIN_BYTES (1 MiB) reads it with a small pure-Python
    msgpack reader over a memoryview of the frame: tensors are read-only numpy views of the frame
    itself and bins of at least SPLICE_MIN_BYTES are read-only memoryviews of it (bytes fields
    accept any buffer: use ``bytes(m["data"])`` to keep a copy). No byte of a big tensor is copied,
    and such a view keeps the whole frame alive. Smaller bins come back as bytes (copies), so that a
    small value kept for long does not hold on to a big frame. A view may be unaligned for its
    dtype (the wire has no padding): numpy handles that, ``np.require(a, requirements="A")``
    gives an aligned copy. Smaller frames (per-token messages) go through msgpack's C unpacker,
    10-20x faster per item: tensors are views of the bytes it decoded, i.e. one copy. So does a
    big frame made of many small items (more than one per 4 KiB): there the reader's per-item
    cost would exceed the copies it saves.
  Both decode paths accept the same frames and refuse the same ones with the same code and field
  (tests/test_wire_decode.py checks that on arbitrary bytes). Why avoid the copies at all: glibc mmaps
  every buffer above 32 MiB afresh, and its page faults make a fresh 64 MB copy 5-6x slower per
  byte than a 16 MB one (benchmarks/bench_codec.py).
"""
from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import numpy as np

from protocol.format import (CLIENT_LIMITS, DEFAULT_LIMITS, DTYPES, MAX_TENSOR_RANK, PROTOCOL_VERSION,
                             SPLICE_MIN_BYTES, TENSOR_TAG, Limits, ProtocolError, encode_nested, tensor_bytes)
from protocol.messages import validate as validate_message
from protocol.msgpack_reader import (READER_BYTES_PER_ITEM, READER_MIN_ITEMS, TooManyItems, deeper_than_msgpack_stack,
                                     read_msgpack, refuse_ext)

__all__ = ["PROTOCOL_VERSION", "DTYPES", "ProtocolError", "Limits", "DEFAULT_LIMITS", "CLIENT_LIMITS",
           "encode", "encode_parts", "decode", "make"]


# ---------------------------------------------------------------------------------------------
# Encoding


def encode(msg: dict, *, validate: bool = True) -> bytes:
    """One message -> one frame of msgpack bytes.

    Checks the message against MESSAGES first (``validate=False`` skips that, e.g. to build bad
    frames in tests). Large top-level tensors and bytes are copied exactly once, into the
    returned bytes; tensors nested in lists/maps are correct too, with one extra copy.
    Raises ProtocolError (bad_field, bad_dtype, ...) for messages that cannot go on the wire.
    Map keys must be str: checked here for the message's own keys, by the decoder for nested maps.
    """
    parts = encode_parts(msg, validate=validate)
    return parts[0] if len(parts) == 1 else b"".join(parts)  # the one copy of the big buffers


def encode_parts(msg: dict, *, validate: bool = True) -> list[bytes | memoryview]:
    """One message -> the pieces of its frame: ``b"".join(encode_parts(m)) == encode(m)``.

    Top-level tensors and bytes of at least SPLICE_MIN_BYTES are pieces of their own, memoryviews
    of the caller's buffers (no copy; an array that is not little-endian and C-ordered is
    converted first, and the view is of that copy). The caller must not modify those buffers until
    the pieces have been sent or joined. Everything else is in bytes pieces, a small message in a
    single one. Same checks and errors as ``encode``.
    """
    if validate:
        validate_message(msg)
    elif not isinstance(msg, dict):
        raise ProtocolError("malformed", f"a message must be a dict, got {type(msg).__name__}")
    for key, value in msg.items():
        if type(key) is not str or (isinstance(value, _BUFFER_TYPES) and _is_large_buffer(value)):
            break
    else:
        try:  # the common case, e.g. a step with one token's hidden state: one C call
            return [msgpack.packb(msg, default=encode_nested)]
        except (TypeError, ValueError, OverflowError, ProtocolError):
            pass  # the field by field path below says which field is wrong
    return _encode_by_field(msg)


_BUFFER_TYPES = (np.ndarray, bytes, bytearray, memoryview)


def _is_large_buffer(value: Any) -> bool:
    size = value.nbytes if isinstance(value, (np.ndarray, memoryview)) else len(value)
    return size >= SPLICE_MIN_BYTES


def _encode_by_field(msg: dict) -> list[bytes | memoryview]:
    """Packs field by field, splicing large tensors and bytes in, and names the field that fails."""
    frame = _FrameBuilder()
    frame.packer.pack_map_header(len(msg))
    for key, value in msg.items():
        if type(key) is not str:
            raise ProtocolError("bad_field", f"message keys must be str, got {key!r:.40}", str(key))
        frame.packer.pack(key)
        try:
            if isinstance(value, np.ndarray):
                frame.tensor(value)
            elif isinstance(value, (bytes, bytearray, memoryview)):
                frame.bin(memoryview(value).cast("B"))
            else:
                frame.packer.pack(value)  # nested tensors go through encode_nested
        except ProtocolError as err:
            err.field = key if err.field is None else f"{key}.{err.field}"
            raise
        except (TypeError, ValueError, OverflowError) as err:
            raise ProtocolError("bad_field", f"field {key!r} cannot be encoded: {err}", key) from err
    return frame.finish()


def make(type_: str, **fields: Any) -> dict:
    """A message dict with "v" and "type" first: ``make("cancel", request_id="r1")``."""
    return {"v": PROTOCOL_VERSION, "type": type_, **fields}


class _FrameBuilder:
    """A frame as a list of pieces: bytes the Packer packed, and big buffers spliced in as-is
    (memoryviews), each after the bin header that the Packer would have written for it."""

    __slots__ = ("packer", "parts")

    def __init__(self):
        self.packer = msgpack.Packer(default=encode_nested, autoreset=False)
        self.parts: list[bytes | memoryview] = []

    def bin(self, data: memoryview) -> None:
        size = data.nbytes
        if size < SPLICE_MIN_BYTES:
            self.packer.pack(data)
            return
        # What was packed so far and the header go out as one piece: fewer, bigger fragments.
        self.parts.append(self.packer.bytes() + _bin_header(size))
        self.packer.reset()
        self.parts.append(data)

    def tensor(self, array: np.ndarray) -> None:
        name, data = tensor_bytes(array)
        if data.nbytes < SPLICE_MIN_BYTES:
            self.packer.pack({TENSOR_TAG: name, "s": list(array.shape), "b": data})
            return
        self.packer.pack_map_header(3)
        for item in (TENSOR_TAG, name, "s", list(array.shape), "b"):
            self.packer.pack(item)
        self.bin(data)

    def finish(self) -> list[bytes | memoryview]:
        tail = self.packer.bytes()
        if tail or not self.parts:  # no empty piece after a buffer that ends the message
            self.parts.append(tail)
        return self.parts


def _bin_header(size: int) -> bytes:
    """msgpack bin header in its smallest form, as any msgpack encoder writes it."""
    if size < 0x100:
        return struct.pack(">BB", 0xC4, size)
    if size < 0x10000:
        return struct.pack(">BH", 0xC5, size)
    if size < 0x100000000:
        return struct.pack(">BI", 0xC6, size)
    raise ProtocolError("frame_too_large", f"{size} bytes do not fit one msgpack bin (4 GiB)")


# ---------------------------------------------------------------------------------------------
# Decoding

# Frames at least this big are decoded zero-copy, by read_msgpack below; smaller ones by
# msgpack's C unpacker. The reader saves a copy of every big bin but costs ~10x more per item
# than C, which wins for the many small per-token messages.
ZERO_COPY_MIN_BYTES = 1 << 20

_SCALAR_TYPES = (type(None), bool, int, float, str, bytes, memoryview)


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS, *, validate: bool = True,
           zero_copy: bool | None = None, view_min_bytes: int = SPLICE_MIN_BYTES) -> dict:
    """One frame -> one message dict, tensors as read-only numpy arrays. Raises ProtocolError and
    nothing else, for any input.

    ``validate=False`` still enforces the format and the limits, but not MESSAGES.
    ``zero_copy`` picks the decoder (see the module docstring): None (the default) by the frame's
    size against ZERO_COPY_MIN_BYTES; True the zero-copy reader, whose tensors and big bins are
    views of ``data`` (do not modify ``data`` while the message is in use), unless the frame has
    too many items for it; False msgpack's C unpacker. All accept and refuse the same frames.
    ``view_min_bytes``: the zero-copy reader's smallest bin read as a view (smaller ones are
    copied); 0 views every bin, for a frame whose every part is kept as long as the frame is.
    """
    try:
        frame = memoryview(data)
    except TypeError:
        raise ProtocolError("malformed", f"a frame must be bytes, got {type(data).__name__}") from None
    size = frame.nbytes
    if size > limits.max_frame_bytes:
        raise ProtocolError("frame_too_large",
                            f"frame of {size} bytes exceeds the limit of {limits.max_frame_bytes}")
    if zero_copy is None:
        zero_copy = size >= ZERO_COPY_MIN_BYTES
    msg = _unpack_zero_copy(frame, limits, view_min_bytes) if zero_copy else _unpack_copying(data, limits)
    if type(msg) is not dict:
        raise ProtocolError("malformed", f"a message must be a map, got {type(msg).__name__}")
    _decode_tree(msg, "", 1, limits)
    if validate:
        validate_message(msg)
    return msg


def _unpack_copying(data: bytes, limits: Limits) -> Any:
    """msgpack's C unpacker: bins come back as bytes (copies)."""
    try:
        return msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True, ext_hook=refuse_ext,
            max_str_len=limits.max_str_len, max_bin_len=limits.max_frame_bytes,
            max_array_len=limits.max_list_len, max_map_len=limits.max_list_len,
            max_ext_len=limits.max_frame_bytes)
    except ProtocolError:
        raise
    except msgpack.exceptions.ExtraData:
        raise ProtocolError("malformed", "trailing bytes after the message") from None
    except msgpack.exceptions.StackError:
        raise deeper_than_msgpack_stack() from None
    except ValueError as err:
        code = "limit_exceeded" if "exceeds max_" in str(err) else "malformed"
        raise ProtocolError(code, f"not a valid msgpack frame: {err}") from None
    except Exception as err:  # noqa: BLE001 - decode must never let a peer's bytes crash us
        raise ProtocolError("malformed", f"not a valid msgpack frame: {type(err).__name__}: {err}") from None


def _unpack_zero_copy(frame: memoryview, limits: Limits, view_min_bytes: int = SPLICE_MIN_BYTES) -> Any:
    """The zero-copy reader, or the C unpacker for a frame with too many items to be worth it."""
    try:
        if frame.format != "B" or frame.ndim != 1:
            frame = frame.cast("B")  # raises TypeError for a non-contiguous buffer
        # A budget of items keeps a hostile big frame of tiny items (64 MB of nils) from costing
        # much more here than in C: past it, C decodes the frame, with the same outcome.
        max_items = READER_MIN_ITEMS + frame.nbytes // READER_BYTES_PER_ITEM
        return read_msgpack(frame.toreadonly(), limits, max_items, view_min_bytes)
    except TooManyItems:
        return _unpack_copying(frame, limits)
    except ProtocolError:
        raise
    except Exception as err:  # noqa: BLE001 - as in _unpack_copying
        raise ProtocolError("malformed", f"not a valid msgpack frame: {type(err).__name__}: {err}") from None


def _decode_tree(node: dict | list, path: str, depth: int, limits: Limits) -> None:
    """Checks one decoded map or list in place (depth, key types, no foreign objects) and turns
    tensor maps into arrays."""
    if depth > limits.max_depth:
        raise ProtocolError("too_deep", f"{path or 'message'} is nested deeper than "
                                        f"{limits.max_depth} maps/lists", path or None)
    is_map = type(node) is dict
    for key, value in node.items() if is_map else enumerate(node):
        if is_map and type(key) is not str:
            raise ProtocolError("malformed", f"map keys must be str, got {key!r:.40} in "
                                             f"{path or 'message'}", path or None)
        kind = type(value)
        if kind is dict:
            where = f"{path}.{key}" if path else str(key)
            if TENSOR_TAG in value:
                node[key] = _tensor_from_map(value, where, limits)
            else:
                _decode_tree(value, where, depth + 1, limits)
        elif kind is list:
            _decode_tree(value, f"{path}.{key}" if path else str(key), depth + 1, limits)
        elif kind not in _SCALAR_TYPES:  # e.g. msgpack's Timestamp (ext -1)
            where = f"{path}.{key}" if path else str(key)
            raise ProtocolError("malformed", f"{where}: {kind.__name__} is not part of the protocol",
                                where)


def _tensor_from_map(tensor_map: dict, where: str, limits: Limits) -> np.ndarray:
    if len(tensor_map) != 3 or "s" not in tensor_map or "b" not in tensor_map:
        raise ProtocolError("malformed", f"tensor {where} must have exactly the keys __t, s, b, "
                                         f"got {list(tensor_map)[:6]!r:.80}", where)
    name, shape, data = tensor_map[TENSOR_TAG], tensor_map["s"], tensor_map["b"]
    if type(name) is not str or name not in limits.allowed_dtypes:
        raise ProtocolError("bad_dtype", f"tensor {where} has dtype {name!r:.40}, allowed: "
                                         f"{', '.join(sorted(limits.allowed_dtypes)) or 'none'}", where)
    if type(shape) is not list or len(shape) > MAX_TENSOR_RANK or not all(
            type(dim) is int and dim >= 0 for dim in shape):
        raise ProtocolError("bad_shape", f"tensor {where} shape must be a list of at most "
                                         f"{MAX_TENSOR_RANK} ints >= 0, got {shape!r:.80}", where)
    count = math.prod(shape)
    if count > limits.max_tensor_elements:
        raise ProtocolError("tensor_too_large", f"tensor {where} has {count} elements, limit "
                                                f"{limits.max_tensor_elements}", where)
    if type(data) is not bytes and type(data) is not memoryview:  # memoryview: zero-copy reader
        raise ProtocolError("malformed", f"tensor {where} data must be bin, got "
                                         f"{type(data).__name__}", where)
    dtype = DTYPES[name]
    if len(data) != count * dtype.itemsize:
        raise ProtocolError("bad_shape", f"tensor {where} has {len(data)} bytes, shape {shape} "
                                         f"x {dtype.itemsize} needs {count * dtype.itemsize}", where)
    return np.ndarray(tuple(shape), dtype, data)  # a read-only view of the bin: no copy



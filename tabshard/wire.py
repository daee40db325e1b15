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
  (tests/test_wire.py checks that on arbitrary bytes). Why avoid the copies at all: glibc mmaps
  every buffer above 32 MiB afresh, and its page faults make a fresh 64 MB copy 5-6x slower per
  byte than a 16 MB one (benchmarks/bench_codec.py).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field as dataclass_field
from typing import Any, Mapping, Union

import msgpack
import numpy as np

__all__ = [
    "PROTOCOL_VERSION", "DTYPES", "ProtocolError", "Limits", "DEFAULT_LIMITS", "CLIENT_LIMITS",
    "encode", "encode_parts", "decode", "validate", "make", "MESSAGES", "MessageSchema", "Field",
    "Tensor", "ListOf", "Struct", "Int", "Float", "Str", "opt", "WORKER", "COORDINATOR", "CLIENT", "ANY",
]

PROTOCOL_VERSION = 1

# Wire dtype names -> the little-endian numpy dtype the bytes are in.
DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype("<f4"),
    "f16": np.dtype("<f2"),
    "i32": np.dtype("<i4"),
    "u32": np.dtype("<u4"),
    "u8": np.dtype("u1"),
    "i8": np.dtype("i1"),
    "i64": np.dtype("<i8"),
}
# (kind, itemsize) finds the wire name whatever the array's byte order.
_WIRE_NAME = {(dt.kind, dt.itemsize): name for name, dt in DTYPES.items()}
_WIRE_NAME_OF_DTYPE = {dt: name for name, dt in DTYPES.items()}

MAX_TENSOR_RANK = 8
TENSOR_TAG = "__t"

# Raw buffers at least this big are spliced into the frame after a hand-written bin header instead
# of going through the Packer, which would copy them into its own growing buffer first (and then
# once more into the final bytes). Smaller ones are cheaper to let the Packer copy.
SPLICE_MIN_BYTES = 64 * 1024


class ProtocolError(Exception):
    """A message broke the wire format or a message schema.

    ``code`` is a short machine string (see the module docstring), ``field`` the dotted path of the
    offending field or None, ``str(err)`` a sentence naming the field.
    """

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.field = field
        self.message = message

    def __repr__(self) -> str:
        return f"ProtocolError(code={self.code!r}, field={self.field!r}, message={self.message!r})"

    def to_message(self) -> dict:
        """The "error" message that tells the peer what was wrong."""
        return {"v": PROTOCOL_VERSION, "type": "error", "code": self.code, "field": self.field,
                "message": self.message}


MAX_DEPTH_LIMIT = 256


@dataclass(frozen=True)
class Limits:
    """What ``decode`` accepts. A peer that exceeds these gets a ProtocolError, never a crash."""

    max_frame_bytes: int = 64 * 1024 * 1024
    max_tensor_elements: int = 16 * 1024 * 1024
    allowed_dtypes: frozenset[str] = frozenset(DTYPES)
    max_depth: int = 16          # nested maps/lists, the message's own map counting as 1
    max_list_len: int = 1 << 20  # entries in any one list or map
    max_str_len: int = 1 << 20   # bytes of UTF-8 in any one str (map keys included)

    def __post_init__(self):
        unknown = set(self.allowed_dtypes) - set(DTYPES)
        if unknown:
            raise ValueError(f"unknown dtype names in allowed_dtypes: {sorted(unknown)}")
        # the decoded tree is checked recursively: keep far below Python's recursion limit
        if not 1 <= self.max_depth <= MAX_DEPTH_LIMIT:
            raise ValueError(f"max_depth must be in [1, {MAX_DEPTH_LIMIT}], got {self.max_depth}")


DEFAULT_LIMITS = Limits()
# For sockets facing API clients: they send small generate/cancel messages and never tensors.
# A small frame limit also bounds the memory a hostile frame can blow up into (an empty msgpack
# list is 1 byte on the wire and ~60 bytes as a Python object).
CLIENT_LIMITS = Limits(max_frame_bytes=1 << 20, max_tensor_elements=0, allowed_dtypes=frozenset())


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
        _validate_message(msg)
    elif not isinstance(msg, dict):
        raise ProtocolError("malformed", f"a message must be a dict, got {type(msg).__name__}")
    for key, value in msg.items():
        if type(key) is not str or (isinstance(value, _BUFFER_TYPES) and _is_large_buffer(value)):
            break
    else:
        try:  # the common case, e.g. a step with one token's hidden state: one C call
            return [msgpack.packb(msg, default=_encode_nested)]
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
                frame.packer.pack(value)  # nested tensors go through _encode_nested
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
        self.packer = msgpack.Packer(default=_encode_nested, autoreset=False)
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
        name, data = _tensor_bytes(array)
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


def _tensor_bytes(array: np.ndarray) -> tuple[str, memoryview]:
    """Wire dtype name and a byte view of the array, little-endian and C-ordered (copied only if
    it was not already)."""
    name = _WIRE_NAME_OF_DTYPE.get(array.dtype)  # exact little-endian dtypes: the fast path
    if name is None:
        name = _WIRE_NAME.get((array.dtype.kind, array.dtype.itemsize))
        if name is None:
            hint = " (cast f64 to f32)" if array.dtype.kind == "f" else ""
            raise ProtocolError("bad_dtype", f"dtype {array.dtype} cannot go on the wire{hint}; "
                                             f"allowed: {', '.join(DTYPES)}")
        array = array.astype(DTYPES[name])  # big-endian -> little-endian
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    if array.size == 0:
        return name, memoryview(b"")  # memoryview.cast refuses shapes with a 0 in them
    return name, memoryview(array).cast("B")


def _encode_nested(obj: Any) -> Any:
    """Packer ``default`` hook: what msgpack itself cannot pack, in lists and maps."""
    if isinstance(obj, np.ndarray):
        name, data = _tensor_bytes(obj)
        return {TENSOR_TAG: name, "s": list(obj.shape), "b": data}
    if isinstance(obj, np.generic):  # np.float32(1.5) from a computation -> 1.5
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not a msgpack type")


# ---------------------------------------------------------------------------------------------
# Decoding

# Frames at least this big are decoded zero-copy, by _read_msgpack below; smaller ones by
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
        _validate_message(msg)
    return msg


def _unpack_copying(data: bytes, limits: Limits) -> Any:
    """msgpack's C unpacker: bins come back as bytes (copies)."""
    try:
        return msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True, ext_hook=_refuse_ext,
            max_str_len=limits.max_str_len, max_bin_len=limits.max_frame_bytes,
            max_array_len=limits.max_list_len, max_map_len=limits.max_list_len,
            max_ext_len=limits.max_frame_bytes)
    except ProtocolError:
        raise
    except msgpack.exceptions.ExtraData:
        raise ProtocolError("malformed", "trailing bytes after the message") from None
    except msgpack.exceptions.StackError:
        raise _deeper_than_msgpack_stack() from None
    except ValueError as err:
        code = "limit_exceeded" if "exceeds max_" in str(err) else "malformed"
        raise ProtocolError(code, f"not a valid msgpack frame: {err}") from None
    except Exception as err:  # noqa: BLE001 - decode must never let a peer's bytes crash us
        raise ProtocolError("malformed", f"not a valid msgpack frame: {type(err).__name__}: {err}") from None


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("malformed", f"msgpack ext type {code} is not part of the protocol")


def _deeper_than_msgpack_stack() -> ProtocolError:
    return ProtocolError("too_deep", "nested deeper than msgpack's own stack")


def _unpack_zero_copy(frame: memoryview, limits: Limits, view_min_bytes: int = SPLICE_MIN_BYTES) -> Any:
    """The zero-copy reader, or the C unpacker for a frame with too many items to be worth it."""
    try:
        if frame.format != "B" or frame.ndim != 1:
            frame = frame.cast("B")  # raises TypeError for a non-contiguous buffer
        # A budget of items keeps a hostile big frame of tiny items (64 MB of nils) from costing
        # much more here than in C: past it, C decodes the frame, with the same outcome.
        max_items = _READER_MIN_ITEMS + frame.nbytes // _READER_BYTES_PER_ITEM
        return _read_msgpack(frame.toreadonly(), limits, max_items, view_min_bytes)
    except _TooManyItems:
        return _unpack_copying(frame, limits)
    except ProtocolError:
        raise
    except Exception as err:  # noqa: BLE001 - as in _unpack_copying
        raise ProtocolError("malformed", f"not a valid msgpack frame: {type(err).__name__}: {err}") from None


# The reader's item budget: 256 items, plus one per 4 KiB of frame. An item costs the reader
# ~0.5-1 us, C ~20-100 ns, and 4 KiB of copy ~1 us: past the budget, the frame is mostly small
# items, which C decodes faster than the reader saves by not copying the bins.
_READER_MIN_ITEMS = 256
_READER_BYTES_PER_ITEM = 4096
# msgpack's C unpacker holds at most this many open (non-empty) containers, and refuses any
# container header beyond it with a StackError: the reader does the same.
_MSGPACK_STACK_SIZE = 1024


class _TooManyItems(Exception):
    """The frame has more items than the reader's budget: decode it with the C unpacker."""


# What follows each msgpack header byte from 0xC0 on (0x00-0xBF and 0xE0-0xFF are fixint,
# fixmap, fixarray and fixstr, handled inline). 0xC1 is never used.
_CONSTANTS = {0xC0: None, 0xC2: False, 0xC3: True}
_NUMBERS = {head: struct.Struct(fmt) for head, fmt in [
    (0xCA, ">f"), (0xCB, ">d"), (0xCC, ">B"), (0xCD, ">H"), (0xCE, ">I"), (0xCF, ">Q"),
    (0xD0, ">b"), (0xD1, ">h"), (0xD2, ">i"), (0xD3, ">q")]}
_STR, _BIN, _EXT, _ARRAY, _MAP = "str", "bin", "ext", "array", "map"
_SIZED = {head: (kind, struct.Struct(fmt)) for head, kind, fmt in [  # kind, then its length
    (0xC4, _BIN, ">B"), (0xC5, _BIN, ">H"), (0xC6, _BIN, ">I"),
    (0xC7, _EXT, ">B"), (0xC8, _EXT, ">H"), (0xC9, _EXT, ">I"),
    (0xD9, _STR, ">B"), (0xDA, _STR, ">H"), (0xDB, _STR, ">I"),
    (0xDC, _ARRAY, ">H"), (0xDD, _ARRAY, ">I"), (0xDE, _MAP, ">H"), (0xDF, _MAP, ">I")]}
_FIXEXT_LENGTH = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_NO_KEY = object()  # an open map waiting for its next key


def _read_msgpack(buf: memoryview, limits: Limits, max_items: int, view_min_bytes: int = SPLICE_MIN_BYTES) -> Any:
    """Decodes one msgpack object from ``buf`` (read-only bytes) as msgpack's C unpacker does with
    decode's options, and refuses what it refuses, at the same point and with the same code. The
    difference: bins of at least ``view_min_bytes`` come back as memoryview slices of ``buf``.

    One loop, no recursion: read one object; if it is a non-empty map or array, open it and read
    its first item; else hand it to the innermost open container, closing each container it fills.
    """
    end = len(buf)
    pos = 0
    open_containers: list[list] = []  # [map or list, items still to come, key read or _NO_KEY]
    items_budget = max_items
    while True:
        # -- one object: a scalar in ``value``, or a container header in (kind, length)
        if pos >= end:
            raise _truncated()
        head = buf[pos]
        pos += 1
        kind = None
        if head <= 0x7F:
            value = head
        elif head >= 0xE0:
            value = head - 0x100
        elif head <= 0x8F:
            kind, length = _MAP, head & 0x0F
        elif head <= 0x9F:
            kind, length = _ARRAY, head & 0x0F
        elif head <= 0xBF:
            kind, length = _STR, head & 0x1F
        elif head in _CONSTANTS:
            value = _CONSTANTS[head]
        elif head in _NUMBERS:
            number = _NUMBERS[head]
            if pos + number.size > end:
                raise _truncated()
            value = number.unpack_from(buf, pos)[0]
            pos += number.size
        elif head in _FIXEXT_LENGTH:
            kind, length = _EXT, _FIXEXT_LENGTH[head]
        elif head in _SIZED:
            kind, length_format = _SIZED[head]
            if pos + length_format.size > end:
                raise _truncated()
            length = length_format.unpack_from(buf, pos)[0]
            pos += length_format.size
        else:  # 0xC1
            raise ProtocolError("malformed", f"not a valid msgpack frame: byte 0x{head:02X} at "
                                             f"offset {pos - 1} is not a msgpack type")

        if kind is _MAP or kind is _ARRAY:
            if len(open_containers) >= _MSGPACK_STACK_SIZE:
                raise _deeper_than_msgpack_stack()
            if length > limits.max_list_len:
                raise _too_long(length, f"max_{kind}_len", limits.max_list_len)
            if length:
                items_budget -= 2 * length if kind is _MAP else length
                if items_budget < 0:
                    raise _TooManyItems()
                open_containers.append([{} if kind is _MAP else [], length, _NO_KEY])
                continue
            value = {} if kind is _MAP else []
        elif kind is not None:  # str, bin or ext: ``length`` bytes of data (ext: after its type)
            if kind is _EXT:
                length += 1
            if pos + length > end:
                raise _truncated()
            start, pos = pos, pos + length
            if kind is _STR:
                # max_bin_len and max_ext_len are max_frame_bytes in decode: a frame can't hold
                # a longer bin or ext, so only str has a limit to check
                if length > limits.max_str_len:
                    raise _too_long(length, "max_str_len", limits.max_str_len)
                try:
                    value = str(buf[start:pos], "utf-8")
                except UnicodeDecodeError as err:
                    raise ProtocolError("malformed", f"not a valid msgpack frame: {err}") from None
            elif kind is _BIN:
                value = buf[start:pos] if length >= view_min_bytes else bytes(buf[start:pos])
            else:
                value = _ext_value(buf[start], buf[start + 1:pos])

        # -- hand the finished object to the innermost open container, closing full ones
        while open_containers:
            innermost = open_containers[-1]
            container = innermost[0]
            if type(container) is list:
                container.append(value)
            elif innermost[2] is _NO_KEY:
                innermost[2] = bytes(value) if type(value) is memoryview else value
                break  # its value comes next
            else:
                key = innermost[2]
                # strict_map_key, checked once the value is read, as C does
                if type(key) is not str and type(key) is not bytes:
                    raise ProtocolError("malformed", f"not a valid msgpack frame: "
                                                     f"{type(key).__name__} is not allowed for map key")
                container[key] = value
                innermost[2] = _NO_KEY
            innermost[1] -= 1
            if innermost[1]:
                break
            open_containers.pop()
            value = container
        else:  # the top-level object is complete
            if pos != end:
                raise ProtocolError("malformed", "trailing bytes after the message")
            return value


def _ext_value(type_byte: int, data: memoryview) -> Any:
    """Ext -1 is msgpack's Timestamp, which the C unpacker builds (and _decode_tree refuses with
    the field's path); any other ext type is refused here, as _refuse_ext does."""
    code = type_byte - 0x100 if type_byte >= 0x80 else type_byte
    if code != -1:
        _refuse_ext(code, data)
    try:
        return msgpack.Timestamp.from_bytes(bytes(data))
    except ValueError as err:
        raise ProtocolError("malformed", f"not a valid msgpack frame: {err}") from None


def _truncated() -> ProtocolError:
    return ProtocolError("malformed", "not a valid msgpack frame: incomplete input")


def _too_long(length: int, limit_name: str, limit: int) -> ProtocolError:
    return ProtocolError("limit_exceeded", f"not a valid msgpack frame: {length} exceeds "
                                           f"{limit_name}({limit})")


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


# ---------------------------------------------------------------------------------------------
# Schemas: which fields each message type has. Field types are:
#   int float str bool bytes dict list     the Python type (float also accepts int: see above)
#   Tensor(("f32", "f16"), rank=2)         an array of one of these dtypes (rank None: any)
#   ListOf(int)                            a list whose items all are of the given type
#   Struct({"name": str, ...})             a map with fields of its own (opt() works inside)
#   opt(type)                              optional: may be missing or nil
#   Int(lo, hi) Float(lo, hi)              a number within [lo, hi] (a float is always finite)
#   Str(max_len)                           a str of at most max_len characters
#   ListOf(spec, max_len=N)                at most N items
#   Struct({...}, max_bytes=N)             the whole map packs to at most N msgpack bytes
# A plain float is finite too: NaN and inf mean nothing in any field of this protocol, and a
# peer's NaN stored as is would reach JSON (/status) and the planner's arithmetic.
# Fields not listed are allowed (forward compatibility) and pass through untouched; a Struct
# with max_bytes bounds them too, so nothing a peer sends is stored unbounded.


@dataclass(frozen=True)
class Tensor:
    dtypes: tuple[str, ...]
    rank: int | None = None


@dataclass(frozen=True)
class ListOf:
    item: "Spec"
    max_len: int | None = None


@dataclass(frozen=True)
class Struct:
    fields: Mapping[str, Any]  # name -> Spec or Field, like a message's
    max_bytes: int | None = None  # the map as msgpack, unlisted fields included

    def __post_init__(self):
        object.__setattr__(self, "fields", _fields(self.fields))


I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1


@dataclass(frozen=True)
class Int:
    lo: int = I64_MIN
    hi: int = I64_MAX


@dataclass(frozen=True)
class Float:
    lo: float = -math.inf
    hi: float = math.inf


@dataclass(frozen=True)
class Str:
    max_len: int


Spec = Union[type, Tensor, ListOf, Struct, Int, Float, Str]


@dataclass(frozen=True)
class Field:
    spec: Spec
    required: bool = True


def opt(spec: Spec) -> Field:
    return Field(spec, required=False)


@dataclass(frozen=True)
class MessageSchema:
    type: str
    sender: str  # "worker", "coordinator", "client" or "any"
    fields: Mapping[str, Any] = dataclass_field(default_factory=dict)  # name -> Spec or Field
    _check: Any = dataclass_field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "fields", _fields(self.fields))
        object.__setattr__(self, "_check", _checker(Struct(self.fields)))

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(name for name, f in self.fields.items() if f.required)

    @property
    def optional(self) -> tuple[str, ...]:
        return tuple(name for name, f in self.fields.items() if not f.required)


def _fields(table: Mapping[str, Any]) -> dict[str, Field]:
    return {name: f if isinstance(f, Field) else Field(f) for name, f in table.items()}


# A checker returns None when the value fits, else (path below the value, what was expected,
# the value found); "expected" None means a required field is missing. Checkers are built once
# per schema, and a path string only when something is wrong: validation runs on every message.
_Checker = Any


def _checker(spec: Spec) -> _Checker:
    expected = _spec_name(spec)
    if isinstance(spec, Tensor):
        dtypes, rank = frozenset(spec.dtypes), spec.rank

        def check_tensor(value):
            if (isinstance(value, np.ndarray) and _wire_name(value.dtype) in dtypes
                    and (rank is None or value.ndim == rank)):
                return None
            return (), expected, value
        return check_tensor
    if isinstance(spec, ListOf):
        check_item, max_len = _checker(spec.item), spec.max_len

        def check_list(value):
            if not isinstance(value, (list, tuple)) or (max_len is not None and len(value) > max_len):
                return (), expected, value
            for index, item in enumerate(value):
                problem = check_item(item)
                if problem is not None:
                    return (index, *problem[0]), problem[1], problem[2]
            return None
        return check_list
    if isinstance(spec, Struct):
        fields = [(name, f.required, _checker(f.spec)) for name, f in spec.fields.items()]
        max_bytes = spec.max_bytes

        def check_struct(value):
            if not isinstance(value, dict) or (max_bytes is not None and _packed_size(value, max_bytes) > max_bytes):
                return (), expected, value
            for name, required, check_field in fields:
                item = value.get(name)
                if item is None:
                    if required:
                        return (name,), None, None
                    continue
                problem = check_field(item)
                if problem is not None:
                    return (name, *problem[0]), problem[1], problem[2]
            return None
        return check_struct
    if isinstance(spec, Int):
        lo, hi = spec.lo, spec.hi
        return lambda value: None if _is_int(value) and lo <= value <= hi else ((), expected, value)
    if isinstance(spec, Float):
        lo, hi = spec.lo, spec.hi
        return lambda value: None if _is_float(value) and lo <= value <= hi else ((), expected, value)
    if isinstance(spec, Str):
        max_len = spec.max_len
        return lambda value: None if isinstance(value, str) and len(value) <= max_len else ((), expected, value)
    fits = _SIMPLE_CHECKS[spec]
    return lambda value: None if fits(value) else ((), expected, value)


def _packed_size(value: dict, limit: int) -> int:
    """msgpack size of a decoded map (tensors as their wire maps); only the small maps that
    carry a max_bytes are measured, and at most once per message."""
    try:
        return len(msgpack.packb(value, default=_encode_nested))
    except (TypeError, ValueError, OverflowError, ProtocolError):
        return limit + 1


def _wire_name(dtype: np.dtype) -> str | None:
    return _WIRE_NAME_OF_DTYPE.get(dtype) or _WIRE_NAME.get((dtype.kind, dtype.itemsize))


def _is_int(value: Any) -> bool:
    return type(value) is int or (isinstance(value, (int, np.integer))
                                  and not isinstance(value, (bool, np.bool_)))


def _is_float(value: Any) -> bool:
    if type(value) is float or isinstance(value, (float, np.floating)):
        return math.isfinite(value)
    return _is_int(value)


_SIMPLE_CHECKS = {
    int: _is_int,
    float: _is_float,
    str: lambda v: isinstance(v, str),
    bool: lambda v: isinstance(v, (bool, np.bool_)),
    bytes: lambda v: isinstance(v, (bytes, bytearray, memoryview)),
    dict: lambda v: isinstance(v, dict),
    list: lambda v: isinstance(v, (list, tuple)),
}


def _spec_name(spec: Spec) -> str:
    if isinstance(spec, Tensor):
        rank = "" if spec.rank is None else f", rank {spec.rank}"
        return f"a tensor of {'|'.join(spec.dtypes)}{rank}"
    if isinstance(spec, ListOf):
        bound = "" if spec.max_len is None else f" of at most {spec.max_len} items"
        return f"list[{_spec_name(spec.item)}]{bound}"
    if isinstance(spec, Struct):
        bound = "" if spec.max_bytes is None else f" (at most {spec.max_bytes} bytes)"
        return ("a map with " + ", ".join(spec.fields) if spec.fields else "a map") + bound
    if isinstance(spec, Int):
        return f"an int in [{spec.lo}, {spec.hi}]"
    if isinstance(spec, Float):
        return f"a finite float in [{spec.lo:g}, {spec.hi:g}]"
    if isinstance(spec, Str):
        return f"a str of at most {spec.max_len} characters"
    if spec is float:
        return "a finite float"
    return spec.__name__


WORKER, COORDINATOR, CLIENT, ANY = "worker", "coordinator", "client", "any"

# Bounds on what peers send. Every number a worker reports feeds the planner, deadlines or
# /status, every str and map may be stored for as long as the worker's record is kept: each has
# a range or a size, so that a token holder can neither poison arithmetic nor fill memory.
MAX_NAME = 128           # names, ids, codes, reasons
MAX_TEXT = 4096          # an error's message
MAX_PEER_MAP_BYTES = 16 << 10   # free-form maps (capabilities, calibration details, load...)
MAX_BYTES_FIELD = 1 << 50       # byte counts and memory sizes
MAX_LAYER = 1 << 20
MAX_STEP_MS = 3_600_000.0       # an hour: any claim beyond is not a measurement
MAX_BLOBS = 4096                # blob digests a worker may claim to hold
NAME, TEXT, COUNT = Str(MAX_NAME), Str(MAX_TEXT), Int(0, I64_MAX)
PEER_MAP = Struct({}, max_bytes=MAX_PEER_MAP_BYTES)

_ERROR_FIELDS = {"code": Str(64), "field": opt(Str(256)), "message": TEXT}
# topk_rows: the session's last rows that are one decode trip's (default 1; a speculative step
# carries a session's token and its k drafts: k+1 rows); a head stage returns the top-k of each
# of them (topk_ids: one row per such row, sessions in order)
_SESSION = Struct({"session_id": str, "start_pos": int, "length": int, "topk_rows": opt(int)})
_CAPABILITIES = Struct({
    "memory_bytes": opt(Int(0, MAX_BYTES_FIELD)),
    "expansion": opt(Float(0.01, 1000.0)),  # weight bytes in memory per byte on the wire
    "backend": opt(Str(64)),
    "kind": opt(Str(64)),
}, max_bytes=MAX_PEER_MAP_BYTES)
_RESUME = Struct({
    "have": opt(ListOf(Str(128), max_len=MAX_BLOBS)),
    "worker_id": opt(NAME),
}, max_bytes=MAX_BLOBS * 80)

_SCHEMA_TABLE: list[tuple[str, str, dict[str, Any]]] = [
    # -- worker -> coordinator --------------------------------------------------------------
    ("hello", WORKER, {
        "worker_name": NAME,
        "token": opt(Str(256)),
        "capabilities": _CAPABILITIES,
        "resume": opt(_RESUME),
    }),
    ("calibration_result", WORKER, {
        "step_ms": Float(0.0, MAX_STEP_MS),
        "details": opt(Struct({"expansion": opt(Float(0.01, 1000.0)), "backend": opt(Str(64))},
                              max_bytes=MAX_PEER_MAP_BYTES)),
    }),
    ("load_progress", WORKER, {
        "layer": Int(0, MAX_LAYER),
        "received_bytes": Int(0, MAX_BYTES_FIELD),
        "total_bytes": Int(0, MAX_BYTES_FIELD),
    }),
    ("weights_ack", WORKER, {
        "chunk_id": COUNT,
        "ok": bool,
        "error": opt(TEXT),
    }),
    ("ready", WORKER, {
        "layers": ListOf(Int(0, MAX_LAYER)),
        "checksum": Str(128),
    }),
    ("step_result", WORKER, {
        "step_id": COUNT,
        "epoch": COUNT,
        "output": Tensor(("f32", "f16")),
        "topk_ids": opt(Tensor(("i32",))),
        "topk_logits": opt(Tensor(("f32",))),
        "compute_ms": opt(Float(0.0, MAX_STEP_MS)),
    }),
    ("heartbeat", WORKER, {
        "seq": int,
        "load": opt(PEER_MAP),
    }),
    ("refuse", WORKER, {
        "reason": NAME,
        "detail": opt(Struct({"budget": opt(Int(0, MAX_BYTES_FIELD))}, max_bytes=MAX_PEER_MAP_BYTES)),
    }),
    ("bye", WORKER, {
        "reason": Str(256),
    }),
    # -- coordinator -> worker --------------------------------------------------------------
    ("welcome", COORDINATOR, {
        "worker_id": str,
        "heartbeat_ms": int,
        "epoch": int,
    }),
    ("calibrate", COORDINATOR, {
        "layers": opt(int),
        "tokens": opt(int),
    }),
    ("assign", COORDINATOR, {
        "assignment_id": int,
        "layer_start": int,
        "layer_end": int,
        "include_head": bool,
        "precision": opt(dict),
        "model": dict,
        "chunks": list,
    }),
    ("weights_chunk", COORDINATOR, {
        "chunk_id": int,
        "name": str,
        "offset": int,
        "total": int,
        "data": bytes,
        "sha256": str,
    }),
    ("step", COORDINATOR, {
        "step_id": int,
        "epoch": int,
        "sessions": ListOf(_SESSION),
        "hidden": Tensor(("f32",)),
        "want_topk": opt(int),
    }),
    ("drop_session", COORDINATOR, {
        "session_id": str,
    }),
    ("fork_session", COORDINATOR, {
        "source_id": str,
        "session_id": str,
        "length": int,
    }),
    # the session's KV keeps positions [0, length) on every range held here (rejected drafts go)
    ("truncate_session", COORDINATOR, {
        "session_id": str,
        "length": int,
    }),
    ("unload", COORDINATOR, {
        "reason": opt(str),
    }),
    # -- client <-> coordinator (token stream) -----------------------------------------------
    ("generate", CLIENT, {
        "request_id": NAME,
        "prompt": opt(str),
        "messages": opt(list),
        "max_tokens": opt(int),
        "temperature": opt(float),
        "top_p": opt(float),
        "top_k": opt(int),
        "seed": opt(int),
        "greedy": opt(bool),
    }),
    ("cancel", CLIENT, {
        "request_id": NAME,
    }),
    ("token", COORDINATOR, {
        "request_id": str,
        "index": int,
        "token_id": int,
        "text": str,
    }),
    ("done", COORDINATOR, {
        "request_id": str,
        "finish_reason": str,
        "usage": opt(dict),
    }),
    # tokens from `index` on were withdrawn (a worker caught returning wrong results made
    # them), with the last `retract_chars` characters of the text sent so far; the next
    # token message has this index
    ("rewind", COORDINATOR, {
        "request_id": str,
        "index": int,
        "retract_chars": int,
        "reason": str,
    }),
    # -- any direction -----------------------------------------------------------------------
    ("error", ANY, _ERROR_FIELDS),
]

MESSAGES: dict[str, MessageSchema] = {
    name: MessageSchema(name, sender, table) for name, sender, table in _SCHEMA_TABLE
}


def validate(msg: dict) -> dict:
    """Checks a message against MESSAGES; returns it unchanged, or raises ProtocolError
    (version_mismatch, unknown_type, bad_field)."""
    return _validate_message(msg)


def _validate_message(msg: Any) -> dict:
    if not isinstance(msg, dict):
        raise ProtocolError("malformed", f"a message must be a map, got {type(msg).__name__}")
    version = msg.get("v")
    if not _is_int(version):
        raise ProtocolError("bad_field", f"field 'v' must be the protocol version (int), got "
                                         f"{_describe(version)}", "v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("version_mismatch", f"protocol version {version} is not "
                                                f"{PROTOCOL_VERSION}", "v")
    type_ = msg.get("type")
    if not isinstance(type_, str):
        raise ProtocolError("bad_field", f"field 'type' must be str, got {_describe(type_)}", "type")
    schema = MESSAGES.get(type_)
    if schema is None:
        raise ProtocolError("unknown_type", f"unknown message type {type_!r:.80}", "type")
    problem = schema._check(msg)
    if problem is not None:
        path, expected, value = problem
        where = ".".join(map(str, path))
        if expected is None:
            raise ProtocolError("bad_field", f"{type_}: required field {where!r} is missing or nil",
                                where)
        raise ProtocolError("bad_field", f"{type_}: field {where!r} must be {expected}, got "
                                         f"{_describe(value)}", where)
    return msg


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        name = _wire_name(value.dtype) or str(value.dtype)
        return f"a tensor of {name}, shape {list(value.shape)}"
    if isinstance(value, (str, bytes, bytearray, list, tuple, dict)):  # never repr a huge value
        return f"{type(value).__name__} of length {len(value)}"
    return f"{type(value).__name__} {value!r:.60}"

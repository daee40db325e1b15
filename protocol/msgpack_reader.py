"""A pure-Python msgpack reader over a memoryview: big tensors and bins come back as views of the
frame, not copies (protocol/wire.py's decode uses it for frames of ZERO_COPY_MIN_BYTES and more,
msgpack's C unpacker below that). It accepts and refuses exactly what the C unpacker does."""
from __future__ import annotations

import struct
from typing import Any

import msgpack

from protocol.format import SPLICE_MIN_BYTES, Limits, ProtocolError

# The reader's item budget: 256 items, plus one per 4 KiB of frame. An item costs the reader
# ~0.5-1 us, C ~20-100 ns, and 4 KiB of copy ~1 us: past the budget, the frame is mostly small
# items, which C decodes faster than the reader saves by not copying the bins.
READER_MIN_ITEMS = 256
READER_BYTES_PER_ITEM = 4096
# msgpack's C unpacker holds at most this many open (non-empty) containers, and refuses any
# container header beyond it with a StackError: the reader does the same.
_MSGPACK_STACK_SIZE = 1024


class TooManyItems(Exception):
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


def read_msgpack(buf: memoryview, limits: Limits, max_items: int, view_min_bytes: int = SPLICE_MIN_BYTES) -> Any:
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
                raise deeper_than_msgpack_stack()
            if length > limits.max_list_len:
                raise _too_long(length, f"max_{kind}_len", limits.max_list_len)
            if length:
                items_budget -= 2 * length if kind is _MAP else length
                if items_budget < 0:
                    raise TooManyItems()
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
    the field's path); any other ext type is refused here, as refuse_ext does."""
    code = type_byte - 0x100 if type_byte >= 0x80 else type_byte
    if code != -1:
        refuse_ext(code, data)
    try:
        return msgpack.Timestamp.from_bytes(bytes(data))
    except ValueError as err:
        raise ProtocolError("malformed", f"not a valid msgpack frame: {err}") from None


def _truncated() -> ProtocolError:
    return ProtocolError("malformed", "not a valid msgpack frame: incomplete input")


def _too_long(length: int, limit_name: str, limit: int) -> ProtocolError:
    return ProtocolError("limit_exceeded", f"not a valid msgpack frame: {length} exceeds "
                                           f"{limit_name}({limit})")


def refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("malformed", f"msgpack ext type {code} is not part of the protocol")


def deeper_than_msgpack_stack() -> ProtocolError:
    return ProtocolError("too_deep", "nested deeper than msgpack's own stack")

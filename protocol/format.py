"""The wire format's constants: the protocol version, tensor dtypes, and what a decoder accepts
(Limits), and the error a peer's bad bytes become. protocol/wire.py is the codec, protocol/messages.py the message schemas."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

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


def tensor_bytes(array: np.ndarray) -> tuple[str, memoryview]:
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


def encode_nested(obj: Any) -> Any:
    """Packer ``default`` hook: what msgpack itself cannot pack, in lists and maps."""
    if isinstance(obj, np.ndarray):
        name, data = tensor_bytes(obj)
        return {TENSOR_TAG: name, "s": list(obj.shape), "b": data}
    if isinstance(obj, np.generic):  # np.float32(1.5) from a computation -> 1.5
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not a msgpack type")


def wire_name(dtype: np.dtype) -> str | None:
    return _WIRE_NAME_OF_DTYPE.get(dtype) or _WIRE_NAME.get((dtype.kind, dtype.itemsize))

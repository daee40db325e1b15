"""Every message type, its sender and its fields: the one schema both codecs check against.

`validate` checks a decoded message (protocol/wire.py's decode calls it); `js_schema` is the same
table in the form the browser's codec reads (tab_worker/web/build.py writes it into the tab's
dist/messages.js), so the Python and the JS side cannot disagree on a field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field as dataclass_field
from typing import Any, Mapping, Union

import msgpack
import numpy as np

from protocol.format import PROTOCOL_VERSION, ProtocolError, encode_nested, wire_name

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
            if (isinstance(value, np.ndarray) and wire_name(value.dtype) in dtypes
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
        return len(msgpack.packb(value, default=encode_nested))
    except (TypeError, ValueError, OverflowError, ProtocolError):
        return limit + 1



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

# How often a worker sends a heartbeat until its welcome names the coordinator's own setting
# (CoordinatorSettings.heartbeat_ms defaults to it too)
DEFAULT_HEARTBEAT_MS = 250

# Bounds on what peers send. Every number a worker reports feeds the planner, deadlines or
# /status, every str and map may be stored for as long as the worker's record is kept: each has
# a range or a size, so that a token holder can neither poison arithmetic nor fill memory.
MAX_NAME = 128           # names, ids, codes, reasons
MAX_TEXT = 4096          # an error's message
MAX_PEER_MAP_BYTES = 16 << 10   # free-form maps (capabilities, measurement details, load...)
MAX_BYTES_FIELD = 1 << 50       # byte counts and memory sizes
MAX_LAYER = 1 << 20
MAX_STEP_MS = 3_600_000.0       # an hour: any claim beyond is not a measurement
MAX_BLOBS = 4096                # blob digests a worker may claim to hold
MAX_DRAFT_K = 16                # the most drafts one speculative trip carries
MAX_CONTEXT = 1 << 17           # tokens of a session's context (prompt + output) a draft request carries
NAME, TEXT, COUNT = Str(MAX_NAME), Str(MAX_TEXT), Int(0, I64_MAX)
PEER_MAP = Struct({}, max_bytes=MAX_PEER_MAP_BYTES)

# retry_after_s: a refusal that lifts (code "backoff"): when the sender may try again
_ERROR_FIELDS = {"code": Str(64), "field": opt(Str(256)), "message": TEXT, "retry_after_s": opt(Float(0.0, 1e6))}
# topk_rows: the session's last rows that are one decode trip's (default 1; a speculative step
# carries a session's token and its k drafts: k+1 rows); a head stage returns the top-k of each
# of them (topk_ids: one row per such row, sessions in order)
_SESSION = Struct({"session_id": str, "start_pos": int, "length": int, "topk_rows": opt(int)})
_CAPABILITIES = Struct({
    "memory_bytes": opt(Int(0, MAX_BYTES_FIELD)),
    "expansion": opt(Float(0.01, 1000.0)),  # weight bytes in memory per byte on the wire
    "backend": opt(Str(64)),
    "kind": opt(Str(64)),
    # a worker holding a draft model (tabshard worker --draft-model) drafts for speculation
    "draft_model": opt(Struct({"vocab": Int(1, 1 << 24), "layers": Int(0, MAX_LAYER), "name": opt(NAME)},
                              max_bytes=1024)),
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
    ("measurement", WORKER, {
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
        "blob": opt(Str(128)),  # the sha256 of the blob the chunk belongs to
    }),
    # corrections: the assign's precision settings this worker could not honour, each a map of
    # setting, asked, used, reason
    ("ready", WORKER, {
        "assignment_id": opt(COUNT),
        "layers": ListOf(Int(0, MAX_LAYER)),
        "checksum": Str(128),
        "corrections": opt(ListOf(PEER_MAP, max_len=64)),
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
    # the draft tokens a `draft` asked for (its trip), at most its k: the draft model's argmax each
    ("draft_result", WORKER, {
        "session_id": NAME,
        "trip": COUNT,
        "tokens": ListOf(Int(0, I64_MAX), max_len=MAX_DRAFT_K),
    }),
    # a copy_kv done (ok) or not (error: the coordinator replays those positions instead)
    ("kv_copied", WORKER, {
        "session_id": NAME,
        "layer_start": Int(0, MAX_LAYER),
        "layer_end": Int(0, MAX_LAYER),
        "length": Int(0, MAX_CONTEXT),
        "ok": bool,
        "error": opt(TEXT),
    }),
    ("pong", WORKER, {  # answers a ping at once, from the socket's side (the round trip, not the compute queue)
        "nonce": COUNT,
    }),
    # -- coordinator -> worker --------------------------------------------------------------
    ("welcome", COORDINATOR, {
        "worker_id": str,
        "heartbeat_ms": int,
        "epoch": int,
        # the tab's pass (coordinator/security.Standing): presented as the worker socket's
        # `?standing=` query when it reconnects, it lets the tab rejoin while its address is backed
        # off for another tab's offenses, once this worker has passed probation
        "standing": opt(str),
    }),
    ("measure", COORDINATOR, {
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
        "blob": opt(str),  # the sha256 of the whole blob this chunk is a piece of
    }),
    ("step", COORDINATOR, {
        "step_id": int,
        "epoch": int,
        "sessions": ListOf(_SESSION),
        "hidden": Tensor(("f32",)),
        "want_topk": opt(int),
    }),
    ("ping", COORDINATOR, {  # the coordinator times each worker's round trip with these
        "nonce": COUNT,
    }),
    ("drop_session", COORDINATOR, {
        "session_id": str,
    }),
    ("fork_session", COORDINATOR, {
        "source_id": str,
        "session_id": str,
        "length": int,
    }),
    # the session's KV of layers [layer_start, layer_end), positions [0, length), as the range
    # [source_start, source_end) held here has it, becomes that session's whole KV in the range
    # [layer_start, layer_end) held here (a session moving to a pipeline whose stage this worker
    # serves, from one whose wider stage it serves, needs no replay there); answered by kv_copied
    ("copy_kv", COORDINATOR, {
        "session_id": str,
        "source_start": int,
        "source_end": int,
        "layer_start": int,
        "layer_end": int,
        "length": int,
    }),
    # the session's KV keeps positions [0, length) on every range held here (rejected drafts go)
    ("truncate_session", COORDINATOR, {
        "session_id": str,
        "length": int,
    }),
    # speculation by a worker's draft model: up to k tokens to follow the session's context
    # (prompt and tokens so far); the worker keeps a draft KV cache per session until drop_session
    ("draft", COORDINATOR, {
        "session_id": NAME,
        "context": ListOf(Int(0, I64_MAX), max_len=MAX_CONTEXT),
        "k": Int(1, MAX_DRAFT_K),
        "trip": COUNT,
    }),
    # one range [layer_start, layer_end) goes; without them, every range held
    ("unload", COORDINATOR, {
        "reason": opt(str),
        "layer_start": opt(int),
        "layer_end": opt(int),
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
        name = wire_name(value.dtype) or str(value.dtype)
        return f"a tensor of {name}, shape {list(value.shape)}"
    if isinstance(value, (str, bytes, bytearray, list, tuple, dict)):  # never repr a huge value
        return f"{type(value).__name__} of length {len(value)}"
    return f"{type(value).__name__} {value!r:.60}"


# ---------------------------------------------------------------------------------------------
# The same table for the browser's codec (tab_worker/web/codec.js validates with it): written
# into the tab's dist/messages.js by tab_worker/web/build.py, so the two sides cannot drift. A
# spec there is "int" "float" "str" "bool" "bytes" "dict" "list", {tensor: [dtypes], rank},
# {listOf: spec, maxLen}, {struct: {...}, maxBytes}, {int: [lo, hi]}, {float: [lo, hi]},
# {str: maxLen}, and {opt: spec} for an optional field.

def js_schema() -> dict:
    """MESSAGES as JSON-able data in the JS codec's spec form: type -> field -> spec."""
    return {name: {field: _js_field(f) for field, f in schema.fields.items()} for name, schema in MESSAGES.items()}


def _js_field(f: Field) -> Any:
    return _js_spec(f.spec) if f.required else {"opt": _js_spec(f.spec)}


def _js_spec(spec: Spec) -> Any:
    if isinstance(spec, Tensor):
        return {"tensor": list(spec.dtypes), **({} if spec.rank is None else {"rank": spec.rank})}
    if isinstance(spec, ListOf):
        return {"listOf": _js_spec(spec.item), **({} if spec.max_len is None else {"maxLen": spec.max_len})}
    if isinstance(spec, Struct):
        return {"struct": {name: _js_field(f) for name, f in spec.fields.items()},
                **({} if spec.max_bytes is None else {"maxBytes": spec.max_bytes})}
    if isinstance(spec, Int):
        return {"int": [spec.lo, spec.hi]}
    if isinstance(spec, Float):
        if math.isinf(spec.lo) and math.isinf(spec.hi):
            return "float"
        return {"float": [spec.lo, spec.hi]}
    if isinstance(spec, Str):
        return {"str": spec.max_len}
    return spec.__name__

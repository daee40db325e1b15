"""Golden vectors: tests/vectors/ holds frames both the Python and the JS codec must produce and
accept (tests/js/codec_vectors.mjs checks the JS side). They are written only on purpose:

    .venv/bin/python tests/test_wire_vectors.py --write-vectors
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest

if __name__ == "__main__":  # run as a script (--write-vectors): the repository's packages are importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol import format, wire  # noqa: E402
from protocol.format import ProtocolError
from protocol.wire import decode, encode, make
from tests.wire_samples import NUMPY_DTYPES, SAMPLES, VECTORS_DIR, assert_same, f32, hb, pack, sample_array
from tests.wire_samples import decoder  # noqa: F401 (autouse: every test here runs once per decoder)


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
        ("measurement_nan", "step_ms NaN: floats are finite",
         pack(make("measurement", step_ms=float("nan"))), "bad_field", "step_ms"),
        ("measurement_inf", "step_ms inf", pack(make("measurement", step_ms=float("inf"))),
         "bad_field", "step_ms"),
        ("measurement_negative", "step_ms below its range",
         pack(make("measurement", step_ms=-1.0)), "bad_field", "step_ms"),
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

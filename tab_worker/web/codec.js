// The wire format of protocol/wire.py, in JS, on @msgpack/msgpack (bundled by build.py into
// dist/vendor/msgpack). One message = one msgpack map with "v" and "type" first; tensors are
// {"__t": dtype, "s": shape, "b": raw little-endian bytes}. Here a tensor is a `Tensor`
// {dtype, shape, data}, data a typed array (f16 as raw Uint16Array bits, i64 as BigInt64Array).
//
// JS caveats (see wire.py): a number with an integral value encodes as an int (float fields
// accept ints); bins arrive as Uint8Array views into the frame, unaligned for their dtype, so
// tensors are copied out (`slice`) before a Float32Array is laid over them.
//
// decode() throws only ProtocolError {code, field, message}, with the same codes and fields
// as Python's decode for every frame in tests/vectors.
import { Encoder, Decoder, ExtData } from "./vendor/msgpack/index.mjs";
import { MESSAGES } from "./messages.js";

export const PROTOCOL_VERSION = 1;
export const TENSOR_TAG = "__t";
export const DTYPES = {
  f32: Float32Array, f16: Uint16Array, i32: Int32Array, u32: Uint32Array, u8: Uint8Array, i8: Int8Array,
  i64: BigInt64Array,
};
const MAX_RANK = 8;

export class ProtocolError extends Error {
  constructor(code, message, field = null) {
    super(message);
    this.code = code;
    this.field = field;
  }
  toMessage() {
    return { v: PROTOCOL_VERSION, type: "error", code: this.code, field: this.field, message: this.message };
  }
}

export class Tensor {
  constructor(dtype, shape, data) {
    if (!(dtype in DTYPES)) throw new ProtocolError("bad_dtype", `dtype ${dtype} cannot go on the wire`);
    this.dtype = dtype;
    this.shape = shape.map(Number);
    this.data = data;
  }
  get size() { return this.shape.reduce((a, b) => a * b, 1); }
}

export const Limits = {
  maxFrameBytes: 64 * 1024 * 1024,
  maxTensorElements: 16 * 1024 * 1024,
  maxDepth: 16,
  maxListLen: 1 << 20,
  maxStrLen: 1 << 20,
};

// ------------------------------------------------------------------------------- schemas
// MESSAGES is protocol/messages.py's table, written into dist/messages.js by build.py (the spec
// form is described there). Fields not listed pass through; a "float" is finite.
export { MESSAGES };

const isInt = (v) => (typeof v === "number" && Number.isInteger(v)) || typeof v === "bigint";
const isDict = (v) => v !== null && typeof v === "object" && !Array.isArray(v) && !(v instanceof Tensor) && !ArrayBuffer.isView(v);
const SIMPLE = {
  int: isInt,
  float: (v) => typeof v === "number" && Number.isFinite(v),
  str: (v) => typeof v === "string",
  bool: (v) => typeof v === "boolean",
  bytes: (v) => v instanceof Uint8Array,
  dict: isDict,
  list: Array.isArray,
};

function specName(spec) {
  if (spec === "float") return "a finite float";
  if (typeof spec === "string") return spec;
  if (spec.tensor) return `a tensor of ${spec.tensor.join("|")}${spec.rank === undefined ? "" : `, rank ${spec.rank}`}`;
  if (spec.listOf) return `list[${specName(spec.listOf)}]${spec.maxLen === undefined ? "" : ` of at most ${spec.maxLen} items`}`;
  if (spec.struct) {
    const keys = Object.keys(spec.struct);
    return `${keys.length ? `a map with ${keys.join(", ")}` : "a map"}${spec.maxBytes === undefined ? "" : ` (at most ${spec.maxBytes} bytes)`}`;
  }
  if (spec.int) return `an int in [${spec.int[0]}, ${spec.int[1]}]`;
  if (spec.float) return `a finite float in [${spec.float[0]}, ${spec.float[1]}]`;
  if (spec.str !== undefined) return `a str of at most ${spec.str} characters`;
  return "?";
}

const inRange = (v, [lo, hi]) => Number(v) >= lo && Number(v) <= hi;
// characters as Python counts them (code points), not UTF-16 units
const strLen = (v) => { let n = 0; for (const _ of v) n++; return n; };

// null when value fits spec, else [path, expected (null: missing), value]
function check(spec, value) {
  if (typeof spec === "string") return SIMPLE[spec](value) ? null : [[], spec, value];
  if (spec.tensor) {
    const fits = value instanceof Tensor && spec.tensor.includes(value.dtype) && (spec.rank === undefined || value.shape.length === spec.rank);
    return fits ? null : [[], specName(spec), value];
  }
  if (spec.int) return isInt(value) && inRange(value, spec.int) ? null : [[], specName(spec), value];
  if (spec.float) return SIMPLE.float(value) && inRange(value, spec.float) ? null : [[], specName(spec), value];
  if (spec.str !== undefined) return typeof value === "string" && strLen(value) <= spec.str ? null : [[], specName(spec), value];
  if (spec.listOf) {
    if (!Array.isArray(value) || (spec.maxLen !== undefined && value.length > spec.maxLen)) return [[], specName(spec), value];
    for (let i = 0; i < value.length; i++) {
      const p = check(spec.listOf, value[i]);
      if (p) return [[i, ...p[0]], p[1], p[2]];
    }
    return null;
  }
  if (spec.struct) {
    if (spec.maxBytes !== undefined && isDict(value) && encoder.encode(toWire(value)).byteLength > spec.maxBytes) return [[], specName(spec), value];
    return checkFields(spec.struct, value, specName(spec));
  }
  throw new Error("bad spec");
}

function checkFields(fields, value, expected) {
  if (!isDict(value)) return [[], expected, value];
  for (const [name, f] of Object.entries(fields)) {
    const optional = typeof f === "object" && "opt" in f;
    const spec = optional ? f.opt : f;
    const item = value[name];
    if (item === undefined || item === null) {
      if (!optional) return [[name], null, null];
      continue;
    }
    const p = check(spec, item);
    if (p) return [[name, ...p[0]], p[1], p[2]];
  }
  return null;
}

export function validate(msg) {
  if (!isDict(msg)) throw new ProtocolError("malformed", "a message must be a map");
  if (!isInt(msg.v)) throw new ProtocolError("bad_field", "field 'v' must be the protocol version (int)", "v");
  if (Number(msg.v) !== PROTOCOL_VERSION) throw new ProtocolError("version_mismatch", `protocol version ${msg.v} is not ${PROTOCOL_VERSION}`, "v");
  if (typeof msg.type !== "string") throw new ProtocolError("bad_field", "field 'type' must be str", "type");
  const schema = MESSAGES[msg.type];
  if (!schema) throw new ProtocolError("unknown_type", `unknown message type ${JSON.stringify(msg.type).slice(0, 80)}`, "type");
  const p = checkFields(schema, msg, "a map");
  if (p) {
    const where = p[0].join(".");
    if (p[1] === null) throw new ProtocolError("bad_field", `${msg.type}: required field '${where}' is missing or nil`, where);
    throw new ProtocolError("bad_field", `${msg.type}: field '${where}' must be ${p[1]}`, where);
  }
  return msg;
}

export function make(type, fields = {}) {
  return { v: PROTOCOL_VERSION, type, ...fields };
}

// ------------------------------------------------------------------------------- encode
function bytesOf(data) {
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

function toWire(value) {
  if (value instanceof Tensor) {
    return { [TENSOR_TAG]: value.dtype, s: value.shape, b: bytesOf(value.data) };
  }
  if (Array.isArray(value)) return value.map(toWire);
  if (value !== null && typeof value === "object" && !ArrayBuffer.isView(value)) {
    const out = {};
    for (const [k, v] of Object.entries(value)) if (v !== undefined) out[k] = toWire(v);
    return out;
  }
  return value;
}

const encoder = new Encoder({ ignoreUndefined: true, initialBufferSize: 4096 });

export function encode(msg, { validate: doValidate = true } = {}) {
  if (doValidate) validate(msg);
  return encoder.encode(toWire(msg));  // a fresh Uint8Array (encode copies out of its buffer)
}

// ------------------------------------------------------------------------------- decode
const refuseExt = {
  encode: () => null,
  decode: (_data, type) => { throw new ProtocolError("malformed", `msgpack ext type ${type} is not part of the protocol`); },
};

function makeDecoder(limits) {
  return new Decoder({
    extensionCodec: refuseExt,
    maxStrLength: limits.maxStrLen, maxArrayLength: limits.maxListLen, maxMapLength: limits.maxListLen,
    maxBinLength: limits.maxFrameBytes,
    mapKeyConverter: (key) => {
      if (typeof key !== "string") throw new ProtocolError("malformed", `map keys must be str, got ${String(key).slice(0, 40)}`);
      return key;
    },
  });
}
const decoders = new Map();

function tensorFrom(map, where, limits) {
  const keys = Object.keys(map);
  if (keys.length !== 3 || !("s" in map) || !("b" in map)) {
    throw new ProtocolError("malformed", `tensor ${where} must have exactly the keys __t, s, b`, where);
  }
  const name = map[TENSOR_TAG], shape = map.s, data = map.b;
  if (typeof name !== "string" || !(name in DTYPES)) throw new ProtocolError("bad_dtype", `tensor ${where} has dtype ${String(name).slice(0, 40)}`, where);
  if (!Array.isArray(shape) || shape.length > MAX_RANK || !shape.every((d) => isInt(d) && d >= 0)) {
    throw new ProtocolError("bad_shape", `tensor ${where} shape must be a list of at most ${MAX_RANK} ints >= 0`, where);
  }
  const count = shape.reduce((a, b) => a * Number(b), 1);
  if (count > limits.maxTensorElements) throw new ProtocolError("tensor_too_large", `tensor ${where} has ${count} elements`, where);
  if (!(data instanceof Uint8Array)) throw new ProtocolError("malformed", `tensor ${where} data must be bin`, where);
  const T = DTYPES[name];
  if (data.byteLength !== count * T.BYTES_PER_ELEMENT) {
    throw new ProtocolError("bad_shape", `tensor ${where} has ${data.byteLength} bytes, shape [${shape}] needs ${count * T.BYTES_PER_ELEMENT}`, where);
  }
  // the bin is a view into the frame at any offset: copy so the typed array is aligned
  const aligned = data.byteOffset % T.BYTES_PER_ELEMENT === 0 ? data : data.slice();
  return new Tensor(name, shape.map(Number), new T(aligned.buffer, aligned.byteOffset, count));
}

function walk(node, path, depth, limits) {
  if (depth > limits.maxDepth) throw new ProtocolError("too_deep", `${path || "message"} is nested deeper than ${limits.maxDepth} maps/lists`, path || null);
  const entries = Array.isArray(node) ? node.map((v, i) => [i, v]) : Object.entries(node);
  for (const [key, value] of entries) {
    const where = path ? `${path}.${key}` : String(key);
    if (value instanceof Uint8Array || value === null || typeof value !== "object") continue;
    if (value instanceof ExtData || value instanceof Date) throw new ProtocolError("malformed", `${where}: ext types are not part of the protocol`, where);
    if (!Array.isArray(value) && TENSOR_TAG in value) node[key] = tensorFrom(value, where, limits);
    else walk(value, where, depth + 1, limits);
  }
}

export function decode(frame, limits = Limits) {
  const bytes = frame instanceof Uint8Array ? frame : new Uint8Array(frame);
  if (bytes.byteLength > limits.maxFrameBytes) throw new ProtocolError("frame_too_large", `frame of ${bytes.byteLength} bytes exceeds ${limits.maxFrameBytes}`);
  let decoder = decoders.get(limits);
  if (!decoder) decoders.set(limits, (decoder = makeDecoder(limits)));
  let msg;
  try {
    msg = decoder.decode(bytes);
  } catch (err) {
    if (err instanceof ProtocolError) throw err;
    const limit = /exceeds max|Max length/i.test(String(err.message));
    throw new ProtocolError(limit ? "limit_exceeded" : "malformed", `not a valid msgpack frame: ${err.message}`);
  }
  if (!isDict(msg)) throw new ProtocolError("malformed", `a message must be a map, got ${Array.isArray(msg) ? "list" : typeof msg}`);
  walk(msg, "", 1, limits);
  return validate(msg);
}

// f16 bits -> number (tests and display; compute never sees f16 on the wire)
export function f16ToNumber(h) {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
  if (e === 0) return s * f * 2 ** -24;
  if (e === 31) return f ? NaN : s * Infinity;
  return s * (1 + f / 1024) * 2 ** (e - 15);
}

// Any msgpack value with tensor maps turned into Tensors, without message validation: the
// weight blobs (protocol/blobs.py) are such maps.
export function decodeValue(bytes, limits = { ...Limits, maxFrameBytes: 2 ** 31 - 1, maxTensorElements: 2 ** 31 - 1 }) {
  let decoder = decoders.get(limits);
  if (!decoder) decoders.set(limits, (decoder = makeDecoder(limits)));
  let value;
  try {
    value = decoder.decode(bytes);
  } catch (err) {
    if (err instanceof ProtocolError) throw err;
    throw new ProtocolError("malformed", `not valid msgpack: ${err.message}`);
  }
  if (isDict(value)) walk(value, "", 1, limits);
  return value;
}

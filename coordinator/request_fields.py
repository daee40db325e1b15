"""What an HTTP request may carry and how its fields are read: the numeric tables (type, default,
bounds) that coordinator/app.py and coordinator/openai_request.py check and coordinator/openapi.py
documents, the body reader, and the error every endpoint answers a bad field with."""
from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from model.sampling import CANDIDATES, SEED_MAX, USER_DEFAULTS, SamplingParams, resolve_params
from protocol.errors import ConfigError

MODEL_ID = "smollm2-135m-instruct"
# numeric request fields: (type, default, lowest, highest), checked by `_num`; null means the
# default. coordinator/openapi.py documents these very tables (GET /openapi.json).
SAMPLING_FIELDS = {"temperature": (float, 1.0, 0.0, 2.0), "top_p": (float, 1.0, 0.0, 1.0),
                   "top_k": (int, 0, 0, CANDIDATES), "seed": (int, None, 0, SEED_MAX)}
N_FIELD = (int, 1, 1, 16)
DEFAULT_MAX_TOKENS = USER_DEFAULTS["max_tokens"]  # the CLI's too
FLAGS = ("stream", "greedy")  # booleans (null: false)


def max_tokens_field(limits) -> tuple:
    return (int, min(DEFAULT_MAX_TOKENS, limits.max_output_tokens), 1, limits.max_output_tokens)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def _error(message: str, status: int, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status,
                        headers=headers)


def _num(body: dict, key: str, kind, default, lo=None, hi=None):
    v = body.get(key, default)
    if v is None:
        return default
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if kind is int and isinstance(v, float) and v.is_integer():
        v = int(v)  # JSON has one number type: 2.0 is the integer 2
    if not isinstance(v, kind) or isinstance(v, bool):
        raise BadRequest(f"'{key}' must be a {kind.__name__}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise BadRequest(f"'{key}' must be between {lo} and {hi}, got {v}", key)
    return v


def _flag(body: dict, key: str) -> bool:
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise BadRequest(f"'{key}' must be a boolean", key)
    return bool(v)


def _text(s: str, param: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"'{param}' is not valid Unicode (it holds a lone surrogate)", param) from None
    return s


def sampling_from_body(body: dict) -> SamplingParams:
    """The sampling fields -> SamplingParams by the rules the CLI shares (sampling.resolve_params):
    no seed draws a fresh one, greedy with a non-zero temperature is refused."""
    values = {k: _num(body, k, kind, None, lo, hi) for k, (kind, _default, lo, hi) in SAMPLING_FIELDS.items()}
    try:
        return resolve_params(**values, greedy=_flag(body, "greedy"))
    except ConfigError as exc:
        raise BadRequest(str(exc), "greedy" if "contradict" in str(exc) else None) from None


async def read_body(request: Request, limits) -> bytes | None:
    """The request body, or None past max_request_bytes (read no further: a huge body would
    otherwise sit in memory and be tokenized on the event loop before any limit applies)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_request_bytes:
        return None
    data = bytearray()
    pieces = request.stream().__aiter__()
    while True:
        try:  # a client trickling its body holds a connection: each piece has body_timeout_s
            piece = await asyncio.wait_for(pieces.__anext__(), limits.body_timeout_s)
        except StopAsyncIteration:
            return bytes(data)
        except (asyncio.TimeoutError, ClientDisconnect):  # nobody will read an answer: no traceback either
            raise BodyUnread from None
        data += piece
        if len(data) > limits.max_request_bytes:
            return None


class BodyUnread(Exception):
    """The body did not arrive (the client left, or stalled past body_timeout_s)."""



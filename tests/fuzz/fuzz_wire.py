"""Coverage-guided fuzz target (atheris) for the wire decoder and the message validator: any
bytes must give a message or a ProtocolError, and any decoded message must re-encode and
decode to the same validation outcome. Run it bounded with tests/fuzz/run.sh."""
import sys

import atheris

with atheris.instrument_imports():
    from protocol import messages, wire

LIMITS = [wire.DEFAULT_LIMITS, wire.CLIENT_LIMITS, wire.Limits(max_frame_bytes=4096, max_tensor_elements=64)]


def one_input(data: bytes) -> None:
    limits = LIMITS[len(data) % len(LIMITS)]  # the seeds are whole frames: no selector byte
    try:
        m = wire.decode(data, limits, validate=False)
    except wire.ProtocolError:
        return
    try:
        messages.validate(m)
    except wire.ProtocolError:
        return
    again = wire.decode(wire.encode(m), wire.DEFAULT_LIMITS)  # a valid message survives a round trip
    assert again["type"] == m["type"]


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()

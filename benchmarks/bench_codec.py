"""Wire codec speed: protocol.wire against plain msgpack ways of sending numpy tensors.

    .venv/bin/python benchmarks/bench_codec.py

Prints
  * GB/s of encode, decode and both for one float32 tensor of 16 MB and 64 MB (a step_result),
  * microseconds per message for a `step` carrying one token's hidden state (576 float32),
for these codecs:
  wire, copying     protocol.wire as it was: encode joins the pieces into one bytes (one copy),
                    decode through msgpack's C unpacker (one copy, msgpack's own bin -> bytes)
  wire              encode as above, decode zero-copy (the default for frames >= 1 MiB): the
                    pure-Python reader returns the tensor as a view of the frame
  wire parts        encode_parts (the tensor is a memoryview of the caller's array: no copy) and
                    the zero-copy decode: what a sender passing the pieces to websockets' send()
                    and a receiver decoding the frame it got pay in the codec. Its "both" column is
                    encode_parts + decode of a frame already received, since joining the pieces is
                    the transport's work (the kernel copies them into the socket either way).
  packer+mv         msgpack.packb with memoryviews of the arrays (Packer buffer copy + final copy)
  naive             msgpack.packb with arr.tobytes() in the default hook (copies everywhere)
and what one copy into a fresh bytes object costs (the floor for an encoder returning bytes).
For the others, "both" is decode(encode(m)) timed as one call.

Then the tensor rows again in a child process run with TUNED_GLIBC below. Why: the copies are
not what costs at 64 MB. glibc mmaps every allocation above 32 MiB afresh, and on this kind of VM
the page faults of a fresh 64 MB buffer cap a copy at ~1.5-2 GB/s. Below 32 MiB glibc reuses its
heap, except when a freed top of heap exceeds its (dynamic) trim threshold and goes back to the
OS: decode(encode(m)) in one loop frees two tensor-sized buffers at once and hits exactly that, so
its "both" column can sit far below encode and decode alone. Huge pages (hugetlb=1) make
faults cheap; a fixed mmap/trim threshold keeps the heap. The zero-copy rows allocate nothing
tensor-sized, so neither effect touches them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import msgpack
import numpy as np

from protocol import format, wire


TUNED_GLIBC = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432"
               ":glibc.malloc.trim_threshold=268435456")


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        del result  # free before the next run, as a real sender/receiver would
    return statistics.median(times)


def per_call_seconds(fn, seconds: float = 0.3) -> float:
    """Best of 5 batches, each long enough for the clock: small messages are noisy on 2 cores."""
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - start > seconds / 5:
            break
        calls *= 2
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


# -- the two plain-msgpack codecs to compare with --------------------------------------------

def _tensor_map(array: np.ndarray, data) -> dict:
    return {"__t": format.wire_name(array.dtype), "s": list(array.shape), "b": data}


def _to_array(obj: dict):
    if "__t" in obj:
        return np.frombuffer(obj["b"], wire.DTYPES[obj["__t"]]).reshape(obj["s"])
    return obj


def naive_encode(msg: dict) -> bytes:
    return msgpack.packb(msg, default=lambda array: _tensor_map(array, array.tobytes()))


def memoryview_encode(msg: dict) -> bytes:
    return msgpack.packb(msg, default=lambda array: _tensor_map(array, memoryview(array).cast("B")))


def plain_decode(frame: bytes) -> dict:
    return msgpack.unpackb(frame, object_hook=_to_array)


def zero_copy_decode(frame, limits=wire.DEFAULT_LIMITS) -> dict:
    return wire.decode(frame, limits, zero_copy=True)


def copying_decode(frame, limits=wire.DEFAULT_LIMITS) -> dict:
    return wire.decode(frame, limits, zero_copy=False)


# name -> (encode, decode, whether encode returns pieces rather than one frame)
CODECS = {
    "wire, copying": (wire.encode, copying_decode, False),
    "wire": (wire.encode, zero_copy_decode, False),
    "wire parts": (wire.encode_parts, zero_copy_decode, True),
    "packer+mv": (memoryview_encode, plain_decode, False),
    "naive": (naive_encode, plain_decode, False),
}
WIRE_DECODERS = (zero_copy_decode, copying_decode)


def bench_large(sizes_mb: list[int], repeats: int) -> None:
    print(f"{'one float32 tensor':<24}{'codec':<16}{'encode':>8}{'decode':>8}{'both':>8}   (GB/s)")
    for size_mb in sizes_mb:
        count = size_mb * 1_000_000 // 4
        array = np.random.default_rng(0).random(count, dtype=np.float32)
        msg = wire.make("step_result", step_id=1, epoch=0, output=array)
        limits = wire.Limits(max_frame_bytes=size_mb * 1_000_000 + 4096, max_tensor_elements=count)
        label = f"{size_mb} MB ({count:,} f32)"
        for name, (encode, decode, gives_pieces) in CODECS.items():
            if decode in WIRE_DECODERS:
                decode = lambda frame, decode=decode: decode(frame, limits)  # noqa: E731
            encoded = encode(msg)
            frame = b"".join(encoded) if gives_pieces else encoded
            del encoded
            assert np.array_equal(decode(frame)["output"], array)
            encode_s = median_seconds(lambda: encode(msg), repeats)
            decode_s = median_seconds(lambda: decode(frame), repeats)
            if gives_pieces:  # the transport joins the pieces; see the module docstring
                both_s = median_seconds(lambda: (encode(msg), decode(frame)), repeats)
                del frame
            else:
                del frame
                both_s = median_seconds(lambda: decode(encode(msg)), repeats)
            gbps = [array.nbytes / seconds / 1e9 for seconds in (encode_s, decode_s, both_s)]
            print(f"{label:<24}{name:<16}" + "".join(f"{value:>8.2f}" for value in gbps), flush=True)
            label = ""
        # What any bytes-returning encoder (and msgpack's bin decoding) must at least pay.
        raw = memoryview(array).cast("B")
        print(f"{'':<24}{'floor: 1 copy':<16}"
              f"{array.nbytes / median_seconds(lambda: bytes(raw), repeats) / 1e9:>8.2f}"
              f"{'':>16}   (into a new bytes)", flush=True)


def bench_step_message() -> None:
    hidden = np.random.default_rng(0).random((1, 576), dtype=np.float32)
    msg = wire.make("step", step_id=123, epoch=4,
                    sessions=[{"session_id": "s-0001", "start_pos": 57, "length": 1}],
                    hidden=hidden, want_topk=8)
    print(f"\n{'step, 576 f32 hidden':<22}{'encode':>10}{'decode':>10}{'round trip':>12}"
          f"   (µs per message, {len(wire.encode(msg))} bytes)")
    rows = {
        "wire": (wire.encode, wire.decode),
        "wire, no validate": (lambda m: wire.encode(m, validate=False),
                              lambda f: wire.decode(f, validate=False)),
        "wire, zero-copy": (wire.encode, zero_copy_decode),  # what it would cost: not used here
        "packer+mv": CODECS["packer+mv"][:2],
        "naive": CODECS["naive"][:2],
    }
    for name, (encode, decode) in rows.items():
        frame = encode(msg)
        encode_us = per_call_seconds(lambda: encode(msg)) * 1e6
        decode_us = per_call_seconds(lambda: decode(frame)) * 1e6
        round_trip_us = per_call_seconds(lambda: decode(encode(msg))) * 1e6
        print(f"{name:<22}{encode_us:>10.1f}{decode_us:>10.1f}{round_trip_us:>12.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--only-large", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-tuned-run", action="store_true",
                        help=f"skip the child run under GLIBC_TUNABLES={TUNED_GLIBC}")
    args = parser.parse_args()

    tunables = os.environ.get("GLIBC_TUNABLES", "")
    print(f"# python {sys.version.split()[0]}, numpy {np.__version__}, msgpack "
          f"{'.'.join(map(str, msgpack.version))}, {os.cpu_count()} cpus, "
          f"GLIBC_TUNABLES={tunables or '(unset)'}")
    bench_large(args.sizes_mb, args.repeats)
    if args.only_large:
        return
    bench_step_message()

    if not args.no_tuned_run and not tunables:
        print("\n# the same tensors, glibc malloc on huge pages and keeping its heap:", flush=True)
        env = dict(os.environ, GLIBC_TUNABLES=TUNED_GLIBC)
        subprocess.run([sys.executable, __file__, "--only-large", "--sizes-mb", *map(str, args.sizes_mb),
                        "--repeats", str(args.repeats)], env=env, check=True)


if __name__ == "__main__":
    main()

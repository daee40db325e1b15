"""A simulated CPU tab as a plain process (`python -m actors.tab_process`), started by its node's
tab host (actors/tab_host.py); it never imports Ray. It runs the same `_TabActor` (actors/tab.py)
as a Ray-actor tab, so every fault and profile behaves alike, and answers the host's control
calls as JSON lines: one request a line on its stdin, one reply a line on a private pipe. A tab
whose host is gone sees its stdin close and exits.

    request:  {"id": 7, "method": "freeze", "args": [2.0]}
    reply:    {"id": 7, "ok": <result>}  or  {"id": 7, "error": "TypeError: ..."}
"""
from __future__ import annotations

import json
import os
import sys
import threading


def main() -> None:
    # replies go to a private copy of stdout; fd 1 then points at stderr, so a print in the
    # tab's libraries cannot corrupt the control channel
    control = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from actors.tab import _TabActor

    lock = threading.Lock()

    def reply(obj: dict) -> None:
        with lock:
            control.write(json.dumps(obj) + "\n")
            control.flush()

    init = json.loads(sys.stdin.readline())
    try:
        tab = _TabActor(*init["args"])
    except Exception as exc:
        reply({"id": 0, "error": f"{type(exc).__name__}: {exc}"})
        os._exit(1)
    reply({"id": 0, "ok": os.getpid()})

    def handle(req: dict) -> None:
        try:
            reply({"id": req["id"], "ok": getattr(tab, req["method"])(*req.get("args", ()))})
        except Exception as exc:
            reply({"id": req["id"], "error": f"{type(exc).__name__}: {exc}"})

    for line in sys.stdin:
        # a thread per call: one that takes long (memory_pressure waits for a step) must not
        # hold back an info() or a fault
        threading.Thread(target=handle, args=(json.loads(line),), daemon=True).start()
    os._exit(0)  # the host is gone: so is the tab


if __name__ == "__main__":
    main()

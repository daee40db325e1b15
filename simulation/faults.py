"""Which coordinator events count as detecting a fault of each kind: the scenario runner waits
for them and the report times them."""
from __future__ import annotations

DETECTION_EVENTS = {"death", "quarantine", "refused", "suspect"}
# How long after its injection a fault is given to be seen (before the run ends, before its tab's
# next fault): a frozen or partitioned tab's silence (dead_after_ms 800), a slowed step's deadline
# (step_deadline_min_ms 1500), each on the coordinator's tick (chaos at seed 6 injected a freeze
# 20 ms before the run stopped watching, and reported it undetected)
DETECTION_WINDOW_S = 3.0


def detects(kind: str, event: dict) -> bool:
    """Whether a coordinator event (about the faulty tab's worker) detects a fault of `kind`."""
    if kind == "liar":
        return event["kind"] == "liar_detected" or (
            event["kind"] == "quarantine" and str(event.get("reason", "")).startswith("spot check"))
    return event["kind"] in DETECTION_EVENTS

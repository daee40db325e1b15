"""Which coordinator events count as detecting a fault of each kind: the scenario runner waits
for them and the report times them."""
from __future__ import annotations

DETECTION_EVENTS = {"death", "quarantine", "refused", "suspect"}


def detects(kind: str, event: dict) -> bool:
    """Whether a coordinator event (about the faulty tab's worker) detects a fault of `kind`."""
    if kind == "liar":
        return event["kind"] == "liar_detected" or (
            event["kind"] == "quarantine" and str(event.get("reason", "")).startswith("spot check"))
    return event["kind"] in DETECTION_EVENTS

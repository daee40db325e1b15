"""GET /metrics of a real `tabshard serve` read by prometheus-client's own text-format parser:
the families an operator scrapes are there and move with the traffic."""
import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tabshard.cluster import LocalCluster


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(workers=0, token="metrics") as c:
        yield c


def scrape(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict, name: str, sample: str | None = None, **labels) -> float:
    return sum(s.value for s in families[name].samples
               if (sample is None or s.name == sample) and all(s.labels.get(k) == v for k, v in labels.items()))


def post(base: str, body: dict) -> int:
    req = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_metrics_parse_and_follow_the_traffic(cluster):
    before = scrape(cluster.base)
    for name in ("tabshard_requests", "tabshard_tokens", "tabshard_time_to_first_token_seconds", "tabshard_inter_token_seconds",
                 "tabshard_queue_depth", "tabshard_workers", "tabshard_detections", "tabshard_recoveries",
                 "tabshard_spot_checks", "tabshard_rewinds", "tabshard_worker_bytes_sent", "tabshard_sessions_running",
                 "tabshard_degraded", "tabshard_recovery_seconds"):
        assert name in before, name
    assert before["tabshard_time_to_first_token_seconds"].type == "histogram"
    assert value(before, "tabshard_workers", state="ready") == 1  # the coordinator's own compute
    assert value(before, "tabshard_degraded") == 1  # no tab: the coordinator computes every stage

    n = 5
    assert post(cluster.base, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": n, "temperature": 0}) == 200
    assert post(cluster.base, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "bogus": 1}) == 400
    after = scrape(cluster.base)
    assert value(after, "tabshard_requests", endpoint="chat", status="200") == value(before, "tabshard_requests", endpoint="chat", status="200") + 1
    assert value(after, "tabshard_requests", endpoint="chat", status="400") == value(before, "tabshard_requests", endpoint="chat", status="400") + 1
    made = value(after, "tabshard_tokens", kind="completion") - value(before, "tabshard_tokens", kind="completion")
    assert 1 <= made <= n
    ttft = "tabshard_time_to_first_token_seconds"
    assert value(after, ttft, f"{ttft}_count") == value(before, ttft, f"{ttft}_count") + 1
    itl = "tabshard_inter_token_seconds"
    assert value(after, itl, f"{itl}_count") - value(before, itl, f"{itl}_count") == made - 1
    assert value(after, "tabshard_sessions_running") == 0
    assert value(after, "tabshard_steps") > value(before, "tabshard_steps")

"""Key budgets, priorities and usage accounting, end to end: two router replicas in front of a
real vLLM engine (a tiny Llama with vLLM's priority scheduling), budgets shared through a real
redis-server on 127.0.0.1 and through the embedded store (a Ray actor).

The app ("budgets", under /budgets) shares the session's Ray cluster; switching the store or
its failure policy redeploys only the router, never the engine.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import start_redis, tiny_model_config, wait_for_models

pytestmark = pytest.mark.e2e

MODEL = "tiny-prio"
PREFIX = "/budgets"
KEYS = {
    "rpm": {"key": "sk-rpm", "limits": {"requests_per_minute": 12}},
    "tpm": {"key": "sk-tpm", "limits": {"tokens_per_minute": 1200}},
    "conc": {"key": "sk-conc", "limits": {"max_concurrent_requests": 2}},
    "model": {"key": "sk-model", "model_limits": {MODEL: {"requests_per_minute": 3}}},
    "flood": {"key": "sk-flood", "limits": {"max_concurrent_requests": 4, "tokens_per_minute": 20000}},
    "steady": {"key": "sk-steady"},
    "high": {"key": "sk-high", "priority": "high"},
    "low": {"key": "sk-low", "priority": "low"},
    "admin": {"key": "sk-admin", "admin": True},
}


def key(name: str) -> str:
    return KEYS[name]["key"]


class Budgets:
    """The app's address, and a way to redeploy its router with other store settings."""

    def __init__(self, root: str, deploy) -> None:
        self.root = root
        self.base = f"{root}{PREFIX}"
        self.deploy = deploy
        self.store: str | None = None  # the router's limits_store now

    def chat(self, api_key: str, max_tokens: int = 4, stream: bool = False, **extra) -> httpx.Response:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}],
                "max_tokens": max_tokens, "temperature": 0, "stream": stream, **extra}
        return httpx.post(f"{self.base}/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {api_key}"})


@pytest.fixture(scope="module")
def budget_redis():
    runner = start_redis()
    url = next(runner)
    yield url
    runner.close()


@pytest.fixture(scope="module")
def budgets_app(serve_root: str, tiny_model_path: Path, tmp_path_factory, budget_redis) -> Budgets:
    from ray.serve.api import _run

    from rayllm_app.app import build_app

    keys_file = tmp_path_factory.mktemp("budget-keys") / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": [{"name": name, **entry} for name, entry in KEYS.items()]}))
    model = tiny_model_config(MODEL, tiny_model_path)
    model["engine_config"]["engine_kwargs"].update(scheduling_policy="priority", max_num_seqs=8)
    model["deployment_config"].update(max_ongoing_requests=64)

    def deploy(**router) -> None:
        settings = {"api_keys_file": str(keys_file), "api_keys_env": "RAYLLM_BUDGET_TEST_NO_KEYS",
                    "propagate_env": [], "replicas": 2, **router}
        _run(build_app({"models": [model], "router": settings}), name="budgets", route_prefix=PREFIX,
             _blocking=False)
        _wait_running("budgets")
        wait_for_models(f"{serve_root}{PREFIX}", {MODEL: "ready"}, timeout_s=600)

    deploy(limits_store=budget_redis)
    app = Budgets(serve_root, deploy)
    app.store = budget_redis
    yield app
    from ray import serve

    serve.delete("budgets")


def _wait_running(name: str, timeout_s: float = 600) -> None:
    """The application reached its new target (after a redeploy, the old routers are gone)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            return
        time.sleep(0.5)
    raise AssertionError(f"application {name} did not reach RUNNING: {serve.status().applications.get(name)}")


def _burst(app: Budgets, api_key: str, count: int, workers: int = 8) -> list[httpx.Response]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda _: app.chat(api_key, max_tokens=1), range(count)))


@pytest.fixture(scope="module", params=["redis", "embedded"])
def store_app(request, budgets_app: Budgets, budget_redis) -> Budgets:
    store = budget_redis if request.param == "redis" else "embedded"
    if budgets_app.store != store:
        budgets_app.deploy(limits_store=store)
        budgets_app.store = store
    return budgets_app


def test_requests_per_minute_shared_by_two_routers(store_app: Budgets):
    routers = {httpx.get(f"{store_app.base}/health", timeout=10).json()["router"] for _ in range(30)}
    assert len(routers) == 2, routers  # the proxy spreads requests over both router replicas
    answers = _burst(store_app, key("rpm"), 18)
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    # One budget for both routers: 12 pass (13 if a refill of 1 per 5 s lands in the burst).
    assert 12 <= len(ok) <= 13 and len(ok) + len(refused) == 18, [r.status_code for r in answers]
    error = refused[0].json()["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert "requests per minute" in error["message"] and "'rpm'" in error["message"]
    retry_after = int(refused[0].headers["retry-after"])
    assert 1 <= retry_after <= 5
    assert refused[0].headers["x-ratelimit-limit-requests"] == "12"
    assert ok[0].headers["x-ratelimit-limit-requests"] == "12"
    assert int(ok[0].headers["x-ratelimit-remaining-requests"]) <= 11
    time.sleep(retry_after + 0.5)  # the bucket refills on time
    assert store_app.chat(key("rpm"), max_tokens=1).status_code == 200


def test_tokens_per_minute_trip_within_one_request(store_app: Budgets):
    used = 0
    last_reservation = 0
    started = time.monotonic()
    for _ in range(40):
        answer = store_app.chat(key("tpm"), max_tokens=40)
        if answer.status_code == 429:
            break
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-ratelimit-limit-tokens"] == "1200"
        used += answer.json()["usage"]["total_tokens"]
        last_reservation = 40 + 200 // 4  # max_tokens + the body's size estimate (about 170 bytes)
    else:
        raise AssertionError("the token budget never tripped")
    error = answer.json()["error"]
    assert error["type"] == "tokens" and "tokens per minute" in error["message"]
    refill = (time.monotonic() - started) * 1200 / 60
    # Admitted while the bucket held a reservation; refused once it held less than one.
    assert 1200 - 2 * last_reservation <= used <= 1200 + refill, (used, refill)


def test_concurrency_limit_and_model_scope(store_app: Budgets):
    results: list[httpx.Response] = []
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(store_app.chat, key("conc"), 400, ignore_eos=True) for _ in range(2)]
        time.sleep(0.3)  # both are generating 400 tokens
        results.append(store_app.chat(key("conc"), max_tokens=1))
        results += [f.result() for f in futures]
    assert results[0].status_code == 429 and "concurrent" in results[0].json()["error"]["message"]
    assert [r.status_code for r in results[1:]] == [200, 200]
    assert store_app.chat(key("conc"), max_tokens=1).status_code == 200  # slots were released
    answers = [store_app.chat(key("model"), max_tokens=1) for _ in range(4)]
    assert [a.status_code for a in answers[:3]] == [200, 200, 200] and answers[3].status_code == 429
    assert f"on model '{MODEL}'" in answers[3].json()["error"]["message"]


def test_usage_accounting_matches_the_engine(budgets_app: Budgets):
    """What the router charges equals what vLLM reports, streamed or not; /admin/usage shows it."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{budgets_app.base}/v1", api_key=key("steady"), max_retries=0)
    start = time.time() - 1
    totals = [0, 0]
    for stream in (False, True):
        for max_tokens in (3, 17):
            if stream:
                chunks = list(client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=max_tokens,
                    stream=True, stream_options={"include_usage": True}))
                usage = chunks[-1].usage
            else:
                usage = client.completions.create(model=MODEL, prompt="count to ten", max_tokens=max_tokens).usage
            totals[0] += usage.prompt_tokens
            totals[1] += usage.completion_tokens
    forbidden = httpx.get(f"{budgets_app.base}/admin/usage", headers={"Authorization": f"Bearer {key('steady')}"})
    assert forbidden.status_code == 403 and "admin" in forbidden.json()["error"]["message"]
    rows: list[dict] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # each router flushes its usage every 5 s
        data = httpx.get(f"{budgets_app.base}/admin/usage", params={"since": start},
                         headers={"Authorization": f"Bearer {key('admin')}"}, timeout=30).json()["data"]
        rows = [r for r in data if r["key"] == "steady" and r["model"] == MODEL]
        if rows and rows[0]["requests"] >= 4 and [rows[0]["prompt_tokens"], rows[0]["completion_tokens"]] == totals:
            break
        time.sleep(1)
    assert rows and rows[0]["requests"] == 4, rows
    assert [rows[0]["prompt_tokens"], rows[0]["completion_tokens"]] == totals


def _ttft(app: Budgets, api_key: str) -> float:
    started = time.perf_counter()
    with httpx.stream("POST", f"{app.base}/v1/chat/completions", timeout=120,
                      headers={"Authorization": f"Bearer {api_key}"},
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                            "stream": True}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                return time.perf_counter() - started
    raise AssertionError("no token")


FLOOD_SCRIPT = """
import json, sys, threading, time
import httpx
url, api_key, workers, seconds, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
statuses, stop = [], time.monotonic() + seconds
body = {"model": "%s", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": max_tokens}
def loop():
    with httpx.Client(timeout=120, headers={"Authorization": "Bearer " + api_key}) as client:
        for _ in range(2000):  # bounded in count and in time
            if time.monotonic() > stop:
                return
            answer = client.post(url, json=body)
            statuses.append(answer.status_code)
            if answer.status_code == 429:  # as the openai SDK does: wait what Retry-After says
                time.sleep(min(float(answer.headers.get("retry-after", 1)), 1.0))
threads = [threading.Thread(target=loop) for _ in range(workers)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(statuses))
""" % MODEL


def _ttfts_under(app: Budgets, flood_key: str, flood_workers: int, probe_key: str, probes: int,
                 probe_workers: int = 1, flood_s: float = 12.0) -> tuple[list[float], list[int]]:
    """TTFTs of ``probes`` requests (``probe_workers`` at a time) while another process floods
    the model with ``flood_workers`` concurrent requests of another key (a separate process,
    so the flood's threads never hold the probes' interpreter lock)."""
    flood = subprocess.Popen([sys.executable, "-c", FLOOD_SCRIPT, f"{app.base}/v1/chat/completions", flood_key,
                              str(flood_workers), str(flood_s), "32"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # the flood is on
        with ThreadPoolExecutor(probe_workers) as pool:
            samples = list(pool.map(lambda _: _ttft(app, probe_key), range(probes)))
        assert flood.poll() is None, "the flood ended before the probes did"
        out, _ = flood.communicate(timeout=flood_s + 120)
    finally:
        if flood.poll() is None:
            flood.kill()
    return samples, json.loads(out)


def test_fairness_flooding_key_does_not_starve_another(budgets_app: Budgets, record_property):
    with ThreadPoolExecutor(2) as pool:  # B sends 2 at a time
        alone = list(pool.map(lambda _: _ttft(budgets_app, key("steady")), range(12)))
    under, statuses = _ttfts_under(budgets_app, key("flood"), 32, key("steady"), 12, probe_workers=2)
    ratio = statistics.median(under) / statistics.median(alone)
    record_property("fairness", {"alone_p50_ms": statistics.median(alone) * 1000,
                                 "under_flood_p50_ms": statistics.median(under) * 1000,
                                 "flood_ok": statuses.count(200), "flood_429": statuses.count(429)})
    print(f"fairness: B alone p50 {statistics.median(alone) * 1000:.1f} ms, under A's flood "
          f"{statistics.median(under) * 1000:.1f} ms ({ratio:.2f}x); A: {statuses.count(200)} ok, "
          f"{statuses.count(429)} refused")
    assert statuses.count(429) > 0 and statuses.count(200) > 0
    assert ratio <= 2.0


def test_high_priority_is_served_first_under_a_low_priority_flood(budgets_app: Budgets, record_property):
    idle = [_ttft(budgets_app, key("high")) for _ in range(8)]
    under, statuses = _ttfts_under(budgets_app, key("low"), 24, key("high"), 8)
    normal, _ = _ttfts_under(budgets_app, key("low"), 24, key("steady"), 4)
    ratio = statistics.median(under) / statistics.median(idle)
    print(f"priority: high idle p50 {statistics.median(idle) * 1000:.1f} ms, under a low flood "
          f"{statistics.median(under) * 1000:.1f} ms ({ratio:.2f}x); normal under the flood "
          f"{statistics.median(normal) * 1000:.1f} ms; low: {statuses.count(200)} ok, {statuses.count(429)} shed")
    assert 200 in statuses
    assert ratio <= 2.0
    # Low priority waited at the router: the flood never had all 8 engine slots.


def test_store_going_away_follows_the_policy(budgets_app: Budgets, budget_redis):
    """Fail open: the Redis store dies mid-load and every request still succeeds (unenforced);
    fail closed: a limited key gets 503, an unlimited one is served."""
    dedicated = start_redis()
    url = next(dedicated)
    budgets_app.deploy(limits_store=url, limits_store_failure="open")
    budgets_app.store = url
    statuses: list[int] = []
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(budgets_app.chat, key("flood"), 8) for _ in range(24)]
        time.sleep(0.3)
        dedicated.close()  # the store goes away mid-load
        statuses = [f.result().status_code for f in futures]
    assert statuses.count(200) == 24, statuses
    assert all(budgets_app.chat(key("flood"), 2).status_code == 200 for _ in range(3))
    budgets_app.deploy(limits_store=url, limits_store_failure="closed")
    refused = budgets_app.chat(key("flood"), 2)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "limits_unavailable"
    assert budgets_app.chat(key("steady"), 2).status_code == 200  # no budget to check
    budgets_app.deploy(limits_store=budget_redis)
    budgets_app.store = budget_redis

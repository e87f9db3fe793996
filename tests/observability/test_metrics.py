"""Metrics: re-export of Ray's Prometheus text, the engine stat logger, request timing,
and (e2e) the router's /metrics after real requests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rayllm_app.observability import metrics
from rayllm_app.observability.metrics import (
    EngineStats,
    ModelMetrics,
    collect_prometheus_text,
    engine_stat_logger_factory,
    filter_exposition,
    record_router_request,
    status_of,
)
from tests.conftest import drain

# ------------------------------------------------------------------ helpers


class FakeMetric:
    """Records calls the way ray.util.metrics objects receive them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        assert value > 0, "ray Counter.inc rejects values <= 0"
        self.calls.append(("inc", value, dict(tags or {})))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("observe", value, dict(tags or {})))

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("set", value, dict(tags or {})))

    def values(self, kind: str | None = None) -> list[float]:
        return [value for k, value, _ in self.calls if kind is None or k == kind]


class FakeRegistry:
    def __init__(self) -> None:
        self.metrics: dict[str, FakeMetric] = {}

    def __call__(self, name: str) -> FakeMetric:
        assert name in metrics.METRICS, name
        return self.metrics.setdefault(name, FakeMetric(name))

    def __getitem__(self, name: str) -> FakeMetric:
        return self.metrics[name]


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Parse Prometheus text strictly (prometheus_client's parser) into samples."""
    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


# ------------------------------------------------------------------ Ray text re-export

RAY_LABELS = ('Component="core_worker",NodeAddress="{node}",SessionName="session_x",Version="2.60.0",'
              'WorkerId="{worker}",otel_scope_name="ray._private.telemetry.open_telemetry_metric_recorder",'
              'otel_scope_schema_url="",otel_scope_version=""')


def node_text(node: str, worker: str, requests: float, with_help: bool = True) -> str:
    labels = RAY_LABELS.format(node=node, worker=worker)
    lines = []
    if with_help:
        lines += ["# HELP ray_node_cpu_utilization Total CPU usage",
                  "# TYPE ray_node_cpu_utilization gauge",
                  f'ray_node_cpu_utilization{{ip="{node}"}} 12.0',
                  "# HELP ray_rayllm_requests_total Finished requests",
                  "# TYPE ray_rayllm_requests_total counter"]
    lines += [
        f'ray_rayllm_requests_total{{{labels},model="tiny-chat",source="replica",status="200"}} {requests}',
        f'ray_rayllm_requests_total{{{labels},model="we\\"ird, name",source="router",status="404"}} 1.0',
        "# HELP ray_rayllm_time_to_first_token_seconds TTFT",
        "# TYPE ray_rayllm_time_to_first_token_seconds histogram",
        f'ray_rayllm_time_to_first_token_seconds_bucket{{{labels},le="0.1",model="tiny-chat"}} 1.0',
        f'ray_rayllm_time_to_first_token_seconds_bucket{{{labels},le="+Inf",model="tiny-chat"}} 2.0',
        f'ray_rayllm_time_to_first_token_seconds_count{{{labels},model="tiny-chat"}} 2.0',
        f'ray_rayllm_time_to_first_token_seconds_sum{{{labels},model="tiny-chat"}} 0.35',
        "# HELP ray_serve_num_http_requests_total Serve's own",
        "# TYPE ray_serve_num_http_requests_total counter",
        f'ray_serve_num_http_requests_total{{{labels}}} 7.0',
        "# HELP ray_rayllm_kv_cache_usage_ratio KV",
        "# TYPE ray_rayllm_kv_cache_usage_ratio gauge",
        f'ray_rayllm_kv_cache_usage_ratio{{{labels},model="tiny-chat"}} 0.25',
        "# HELP ray_rayllm_empty_family exported without samples",
        "# TYPE ray_rayllm_empty_family gauge",
    ]
    return "\n".join(lines) + "\n"


class ExportServer:
    """A real HTTP server on 127.0.0.1 serving fixed text at /metrics, optionally slowly."""

    def __init__(self, text: str, delay_s: float = 0.0) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.hits += 1
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                body = outer.text.encode()
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.text, self.delay_s, self.hits = text, delay_s, 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def export_servers() -> Iterator[list[ExportServer]]:
    servers = [ExportServer(node_text("10.0.0.1", "a" * 56, 3.0)),
               ExportServer(node_text("10.0.0.2", "b" * 56, 5.0)),
               ExportServer(node_text("10.0.0.3", "c" * 56, 99.0), delay_s=3.0)]
    yield servers
    for server in servers:
        server.close()


def closed_port_url() -> str:
    server = ExportServer("")
    url = server.url
    server.close()
    return url


def test_collect_merges_nodes_strips_ray_prefix_and_labels(export_servers):
    a, b, slow = export_servers
    endpoints = [("10.0.0.1", a.url), ("10.0.0.2", b.url), ("10.0.0.3", slow.url),
                 ("10.0.0.4", closed_port_url())]
    started = time.monotonic()
    text = asyncio.run(collect_prometheus_text(endpoints=endpoints, timeout_s=1.0))
    assert time.monotonic() - started < 2.9, "the slow node must be skipped after the timeout"
    assert a.hits == b.hits == slow.hits == 1

    # Only rayllm_ families, under their clean names, each announced once.
    lines = text.splitlines()
    assert all(line.split("{")[0].split(" ")[-1].startswith("rayllm_") or line.startswith("# ")
               for line in lines)
    assert "ray_" not in text.replace("rayllm_", "")
    assert [line for line in lines if line.startswith("# TYPE")] == [
        "# TYPE rayllm_requests_total counter",
        "# TYPE rayllm_time_to_first_token_seconds histogram",
        "# TYPE rayllm_kv_cache_usage_ratio gauge",
    ]
    assert "# HELP rayllm_requests_total Finished requests" in lines
    # Ray's bookkeeping labels are gone; node and (short) worker keep samples apart.
    for dropped in ("Component", "SessionName", "Version", "otel_scope", "NodeAddress", "WorkerId"):
        assert dropped not in text
    parsed = samples(text)  # strict parse: well-formed, families contiguous
    requests = {(labels["node"], labels["status"]): value for name, labels, value in parsed
                if name == "rayllm_requests_total"}
    assert requests == {("10.0.0.1", "200"): 3.0, ("10.0.0.2", "200"): 5.0,
                        ("10.0.0.1", "404"): 1.0, ("10.0.0.2", "404"): 1.0}
    workers = {labels["worker"] for name, labels, _ in parsed if name == "rayllm_kv_cache_usage_ratio"}
    assert workers == {"a" * metrics.WORKER_ID_CHARS, "b" * metrics.WORKER_ID_CHARS}
    # Escaped label values survive untouched.
    assert any(labels["model"] == 'we"ird, name' for _, labels, _ in parsed)
    buckets = [(labels["node"], labels["le"], value) for name, labels, value in parsed
               if name == "rayllm_time_to_first_token_seconds_bucket"]
    assert ("10.0.0.2", "+Inf", 2.0) in buckets and len(buckets) == 4


def test_filter_adds_node_label_and_deduplicates():
    plain = ("# HELP rayllm_up help\n# TYPE rayllm_up gauge\nrayllm_up{model=\"m\"} 1\n"
             "rayllm_orphan_total 4 1700000000000\n")
    text = filter_exposition([("n1", plain), ("n2", plain), ("n2", plain)])
    assert text.splitlines() == [
        "# HELP rayllm_up help", "# TYPE rayllm_up gauge",
        'rayllm_up{model="m",node="n1"} 1', 'rayllm_up{model="m",node="n2"} 1',
        'rayllm_orphan_total{node="n1"} 4 1700000000000', 'rayllm_orphan_total{node="n2"} 4 1700000000000',
    ]
    assert filter_exposition([("n1", "# TYPE ray_other gauge\nray_other 1\n")]) == ""
    assert filter_exposition([]) == ""


# ------------------------------------------------------------------ engine stat logger


def vllm_stats(running: int, waiting: int, skipped: int, kv: float, prompt: int, generated: int,
               preempted: int, prefix: tuple[int, int] | None, ttfts: tuple[float, ...] = (),
               itls: tuple[float, ...] = ()) -> tuple[Any, Any]:
    from vllm.v1.metrics.stats import IterationStats, PrefillStats, SchedulerStats

    scheduler = SchedulerStats(num_running_reqs=running, num_waiting_reqs=waiting,
                               num_skipped_waiting_reqs=skipped, kv_cache_usage=kv)
    if prefix is not None:
        scheduler.prefix_cache_stats.record(num_tokens=prefix[0], num_hits=prefix[1], preempted=False)
    iteration = IterationStats()
    if prompt:
        prefill = PrefillStats()
        prefill.set(num_prompt_tokens=prompt, num_local_cached_tokens=0, num_external_cached_tokens=0)
        iteration.prompt_token_stats.update_from_output(prefill)
    iteration.num_generation_tokens = generated
    iteration.num_preempted_reqs = preempted
    iteration.time_to_first_tokens_iter = list(ttfts)
    iteration.inter_token_latencies_iter = list(itls)
    return scheduler, iteration


def test_stat_logger_maps_real_vllm_stats():
    pytest.importorskip("vllm")
    from vllm.v1.metrics.loggers import StatLoggerBase

    registry = FakeRegistry()
    factory = engine_stat_logger_factory("tiny-chat", metric=registry)
    stat_logger = factory(None, 0)  # how vLLM's PerEngineStatLoggerAdapter calls it
    assert isinstance(stat_logger, StatLoggerBase)
    stat_logger.log_engine_initialized()
    tags = {"model": "tiny-chat"}
    for gauge in ("rayllm_running_requests", "rayllm_queued_requests", "rayllm_kv_cache_usage_ratio"):
        assert registry[gauge].calls == [("set", 0, tags)]

    stat_logger.record(*vllm_stats(2, 3, 1, 0.5, prompt=40, generated=2, preempted=1, prefix=(40, 16),
                                    ttfts=(0.25,), itls=(0.01, 0.02)),
                       mm_cache_stats=None, engine_idx=0)
    stat_logger.record(*vllm_stats(2, 3, 1, 0.5, prompt=0, generated=2, preempted=0, prefix=None))
    stat_logger.record(None, None)
    assert registry["rayllm_running_requests"].values("set") == [0, 2]  # set only on change
    assert registry["rayllm_queued_requests"].values("set") == [0, 4]   # waiting + deferred
    assert registry["rayllm_kv_cache_usage_ratio"].values("set") == [0, 0.5]
    assert registry["rayllm_prompt_tokens_total"].values() == [40]
    assert registry["rayllm_generation_tokens_total"].values() == [2, 2]
    assert registry["rayllm_preemptions_total"].values() == [1]
    assert registry["rayllm_prefix_cache_queries_total"].values() == [40]
    assert registry["rayllm_prefix_cache_hits_total"].values() == [16]
    assert registry["rayllm_time_to_first_token_seconds"].values("observe") == [0.25]
    assert registry["rayllm_inter_token_latency_seconds"].values("observe") == [0.01, 0.02]
    assert all(call[2] == tags for metric in registry.metrics.values() for call in metric.calls)

    stat_logger.record(*vllm_stats(0, 0, 0, 0.0, prompt=0, generated=0, preempted=0, prefix=(8, 0)))
    assert registry["rayllm_running_requests"].values("set")[-1] == 0
    assert registry["rayllm_prefix_cache_hits_total"].values() == [16]  # no inc(0)


def test_stat_logger_never_raises_into_the_engine_loop():
    pytest.importorskip("vllm")
    stat_logger = engine_stat_logger_factory("m", metric=FakeRegistry())(None, 0)
    stat_logger.record(object(), object())  # wrong shapes: logged, not raised


def test_engine_stats_records_into_ray_metrics_without_a_cluster():
    """The real ray.util.metrics objects accept every call the mapping makes."""
    pytest.importorskip("vllm")
    stats = EngineStats("m")
    stats.initialized()
    stats.record(*vllm_stats(1, 0, 0, 0.1, prompt=5, generated=1, preempted=0, prefix=(5, 5)))


# ------------------------------------------------------------------ request timing


def fake_clock(monkeypatch: pytest.MonkeyPatch, times: list[float]) -> None:
    ticks = iter(times)
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(ticks))


def test_request_timer_e2e_and_status(monkeypatch):
    registry = FakeRegistry()
    model = ModelMetrics("m", metric=registry)
    fake_clock(monkeypatch, [10.0, 12.0])
    timer = model.start()                              # t=10.0
    timer.finish()                                     # 12.0
    timer.finish(500)                                  # counted once
    assert registry["rayllm_e2e_request_latency_seconds"].values() == [pytest.approx(2.0)]
    assert registry["rayllm_requests_total"].calls == [
        ("inc", 1, {"model": "m", "status": "200", "source": "replica"})]


def test_failed_requests_count_their_status_but_no_e2e():
    registry = FakeRegistry()
    model = ModelMetrics("m", metric=registry)
    model.start().finish(400)
    timer = model.start()
    timer.status = 503
    timer.finish()
    assert [c[2]["status"] for c in registry["rayllm_requests_total"].calls] == ["400", "503"]
    assert not registry["rayllm_e2e_request_latency_seconds"].calls
    assert status_of(asyncio.CancelledError()) == 499
    assert status_of(GeneratorExit()) == 499
    assert status_of(RuntimeError()) == 500


def test_record_router_request(monkeypatch):
    fake = FakeMetric("rayllm_requests_total")
    monkeypatch.setitem(metrics._registry, "rayllm_requests_total", fake)
    record_router_request("tiny-chat", 429)
    record_router_request(None, 404)
    assert fake.calls == [("inc", 1, {"model": "tiny-chat", "status": "429", "source": "router"}),
                          ("inc", 1, {"model": "", "status": "404", "source": "router"})]
    monkeypatch.setitem(metrics._registry, "rayllm_requests_total", None)
    record_router_request("tiny-chat", 500)  # a broken metric never raises into the router


# ------------------------------------------------------------------ the replica's request count (fake engine)


class FakeEngine:
    """Answers every forwarded request with a fixed script of Replies, bytes and errors."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script

    def shutdown(self) -> None:
        pass

    async def handle(self, request: Any, sink: Any = None, wrap: Any = None):
        for item in self.script:
            if isinstance(item, BaseException):
                raise item
            yield item


def fake_server(script: list[Any], registry: FakeRegistry) -> Any:
    from rayllm_app.config import GenerationConfig
    from rayllm_app.replica.deployment import ModelServer
    from rayllm_app.replica.request_defaults import RequestDefaults

    server = ModelServer.__new__(ModelServer)  # no engine start: only the serving hooks
    server.engine = FakeEngine(script)
    server.defaults = RequestDefaults(GenerationConfig())
    server.metrics = ModelMetrics("fake-model", metric=registry)
    return server


def statuses(registry: FakeRegistry) -> list[str]:
    return [c[2]["status"] for c in registry.metrics["rayllm_requests_total"].calls]


def test_replica_counts_statuses():
    from rayllm_app.replica.http_forward import ForwardedRequest, Reply, Usage

    request = ForwardedRequest("POST", "/v1/chat/completions", b'{"model": "fake-model"}')
    sse = {"content-type": "text/event-stream"}
    registry = FakeRegistry()
    ok = fake_server([Reply(200, b"data: {}\n\n", sse), b"data: [DONE]\n\n"], registry)
    assert asyncio.run(ok.forward(request)).body == b"data: {}\n\ndata: [DONE]\n\n"
    drain(ok.forward_stream(request))
    assert statuses(registry) == ["200", "200"]
    assert len(registry["rayllm_e2e_request_latency_seconds"].calls) == 2

    registry = FakeRegistry()
    drain(fake_server([Reply(400, b'{"error": {}}', {})], registry).forward_stream(request))
    failing = [Reply(200, b"data: {}\n\n", sse), b'data: {"error": {"message": "boom"}}\n\ndata: [DONE]\n\n']
    items = drain(fake_server(failing, registry).forward_stream(request))
    assert b"boom" in items[-2] and isinstance(items[-1], Usage)        # mid-stream failure, then usage
    with pytest.raises(RuntimeError):
        drain(fake_server([RuntimeError("engine gone")], registry).forward_stream(request))
    endless = [Reply(200, b"data: {}\n\n", sse)] + [b"data: {}\n\n"] * 50
    drain(fake_server(endless, registry).forward_stream(request), limit=2)  # client went away
    assert statuses(registry) == ["400", "500", "500", "499"]
    assert not registry["rayllm_e2e_request_latency_seconds"].calls


# ------------------------------------------------------------------ end to end


def metric_value(text: str, name: str, **labels: str) -> float:
    return sum(value for sample, sample_labels, value in samples(text)
               if sample == name and all(sample_labels.get(k) == v for k, v in labels.items()))


@pytest.mark.e2e
def test_router_metrics_after_chat_requests(served_app):
    import httpx

    headers = dict(getattr(served_app, "headers", None) or {})
    url = f"{served_app.root_url}/metrics"

    def scrape() -> str:
        response = httpx.get(url, headers=headers, timeout=30)
        assert response.status_code == 200, (response.status_code, response.text[:500])
        return response.text

    before = scrape()
    base_requests = metric_value(before, "rayllm_requests_total", model="tiny-chat", status="200",
                                 source="replica")
    base_ttft = metric_value(before, "rayllm_time_to_first_token_seconds_count", model="tiny-chat")
    client = served_app.client()
    for _ in range(2):
        reply = client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "hello"}], max_tokens=8)
        assert reply.usage.completion_tokens > 0
    deadline = time.monotonic() + 45
    text = ""
    while time.monotonic() < deadline:
        text = scrape()
        if (metric_value(text, "rayllm_requests_total", model="tiny-chat", status="200",
                         source="replica") >= base_requests + 2
                and metric_value(text, "rayllm_time_to_first_token_seconds_count",
                                 model="tiny-chat") >= base_ttft + 2
                and any(n == "rayllm_kv_cache_usage_ratio" and labels.get("model") == "tiny-chat"
                        for n, labels, _ in samples(text))):
            break
        time.sleep(2)
    else:
        pytest.fail(f"metrics did not show the requests within 45 s:\n{text[:4000]}")
    assert metric_value(text, "rayllm_generation_tokens_total", model="tiny-chat") >= 2
    assert metric_value(text, "rayllm_e2e_request_latency_seconds_count", model="tiny-chat") >= 2
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert all(name.startswith("rayllm_") for name in families), families
    assert {"node", "worker"} <= {key for n, labels, _ in samples(text) for key in labels}
    per_series: dict[tuple, int] = defaultdict(int)
    for name, labels, _ in samples(text):
        per_series[(name, tuple(sorted(labels.items())))] += 1
    assert max(per_series.values()) == 1, "duplicate series in /metrics"

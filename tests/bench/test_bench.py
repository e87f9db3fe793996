"""Tests of the load generator (``rayllm bench``).

* Unit tests of the statistics, report, SSE parser and token accounting on hand-made data.
* Load-loop tests against a scripted in-process aiohttp SSE server (time bound, error
  reporting, coalesced chunks); these check the harness's own mechanics only.
* A smoke run against a real OpenAI-compatible server: it needs the ``openai_server``
  fixture from ``tests/conftest.py`` (an object with ``.base_url`` such as
  ``http://127.0.0.1:8000/v1`` and ``.model``, a served tiny model id).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time

import pytest
from aiohttp import web

from rayllm_app.bench import BenchConfig, run_benchmark
from rayllm_app.bench import runner as bench
from rayllm_app.bench.client import ChunkEvent, SSEParser, account_tokens, chunk_text
from rayllm_app.bench.report import (
    BenchResult,
    ProgressLine,
    RequestRecord,
    Stats,
    markdown_report,
    percentile,
    summarize,
)
from rayllm_app.bench.workload import build_payload, parse_len_dist, plan_prompts, request_models

# --------------------------------------------------------------------------- statistics


def test_percentile_matches_linear_interpolation():
    data = [4.0, 1.0, 3.0, 2.0]
    assert percentile(data, 50) == pytest.approx(2.5)
    assert percentile(data, 90) == pytest.approx(3.7)
    assert percentile(data, 99) == pytest.approx(3.97)
    assert percentile(data, 0) == 1.0 and percentile(data, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(data, 101)


def test_percentile_agrees_with_sorted_rank_on_random_data():
    rng = random.Random(1)
    data = [rng.expovariate(1.0) for _ in range(1001)]
    ordered = sorted(data)
    assert percentile(data, 50) == pytest.approx(ordered[500])
    assert percentile(data, 90) == pytest.approx(ordered[900])
    assert percentile(data, 99) == pytest.approx(ordered[990])


def test_stats_scale_and_format():
    s = Stats.of([0.010, 0.020, 0.030, None], scale=1000.0)
    assert s.count == 3
    assert s.mean == pytest.approx(20.0)
    assert (s.min, s.p50, s.max) == pytest.approx((10.0, 20.0, 30.0))
    assert s.p50 <= s.p90 <= s.p99
    assert s.triple() == "20.0 / 28.0 / 29.8"
    assert Stats.of([]).triple() == "n/a"


def _record(i, ok=True, ttft=0.01, times=(0.01, 0.02, 0.05), tokens=(1, 1, 2), **kw):
    return RequestRecord(
        index=i,
        ok=ok,
        start=0.1 * i,
        e2e=0.06,
        ttft=ttft if ok else None,
        prompt_tokens=10 if ok else None,
        output_tokens=int(sum(tokens)) if ok else None,
        chunk_times=list(times) if ok else [],
        chunk_tokens=[float(t) for t in tokens] if ok else [],
        token_source="usage-per-chunk" if ok else "none",
        **kw,
    )


def test_itl_is_per_token_and_chunk_gaps_are_raw():
    rec = _record(0, times=(0.010, 0.020, 0.050), tokens=(1, 1, 3))
    assert rec.chunk_gaps() == pytest.approx([0.010, 0.030])
    # the 3-token chunk after a 30 ms gap gives three 10 ms per-token samples
    assert rec.itl_per_token() == pytest.approx([0.010, 0.010, 0.010, 0.010])
    # TPOT: (last chunk - first) / (tokens - 1) = 40 ms / 4
    assert rec.tpot() == pytest.approx(0.010)


def test_summarize_counts_throughput_and_errors():
    records = [_record(i) for i in range(4)]
    records += [
        _record(4, ok=False, error="HTTP 500: boom"),
        _record(5, ok=False, error="HTTP 500: boom"),
        _record(6, ok=False, error="timeout (--request-timeout)"),
    ]
    res = summarize(
        records, label="x", config={"endpoint": "chat", "stream": True, "concurrency": 2, "output_len": 4},
        started_at="t", duration_s=2.0, num_requests=8, cancelled=1, expected_output_len=4,
    )
    assert (res.completed, res.failed, res.cancelled, res.num_requests) == (4, 3, 1, 8)
    assert res.total_output_tokens == 16 and res.total_input_tokens == 40
    assert res.request_throughput == pytest.approx(2.0)
    assert res.output_throughput == pytest.approx(8.0)
    assert res.total_token_throughput == pytest.approx(28.0)
    assert res.errors["count"] == 3 and res.errors["distinct"] == 2
    assert res.errors["first"][0] == {"message": "HTTP 500: boom", "count": 2}
    assert res.output_len_mismatches == 0
    assert res.ttft_ms.p50 == pytest.approx(10.0)
    assert res.itl_ms.count == 4 * 3  # 1 + 2 per-token samples per request
    assert res.token_source == {"usage-per-chunk": 4}
    # JSON round trip
    again = BenchResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert again == res


def test_markdown_report_rows_and_notes():
    ok = summarize([_record(0)], label="bare c=1", config={"endpoint": "completions", "stream": True,
                   "concurrency": 1}, started_at="t", duration_s=1.0, num_requests=1)
    nonstream = summarize(
        [RequestRecord(index=0, ok=True, start=0, e2e=0.5, prompt_tokens=3, output_tokens=4, token_source="usage"),
         _record(1, ok=False, error="ClientConnectorError: refused")],
        label="ns", config={"endpoint": "chat", "stream": False, "concurrency": 2, "output_len": 8},
        started_at="t", duration_s=1.0, num_requests=2, expected_output_len=8,
    )
    text = markdown_report([ok, nonstream], title="demo")
    lines = text.splitlines()
    assert lines[0] == "## demo"
    assert lines[2].startswith("| run | endpoint |")
    assert "| bare c=1 | completions | yes | 1 | - | 1 / 0 |" in text
    row = next(line for line in lines if line.startswith("| ns |"))
    assert "| 1 / 1 |" in row and row.count("n/a") == 2  # no TTFT / ITL without streaming
    assert "ClientConnectorError: refused" in text
    assert "other than --output-len 8" in text


def test_progress_line_overwrites_one_line():
    class Sink:
        def __init__(self):
            self.parts = []

        def write(self, s):
            self.parts.append(s)

        def flush(self):
            pass

    sink = Sink()
    bar = ProgressLine(10, label="t", stream=sink, hz=1e9)
    bar.update(3, 1, 2, 100)
    bar.update(10, 1, 0, 300, force=True)
    bar.close()
    out = "".join(sink.parts)
    assert out.count("\n") == 1 and out.endswith("\n")
    assert out.count("\r") == 2 and "10/10 err 1" in out
    silent = Sink()
    ProgressLine(5, enabled=False, stream=silent).update(1, 0, 0, 0, force=True)
    assert silent.parts == []


# --------------------------------------------------------------------------- SSE parsing


def test_sse_parser_handles_splits_crlf_comments_and_multiline():
    stream = (
        ": keep-alive comment\r\n\r\n"
        'data: {"a": 1}\r\n\r\n'
        "event: message\nid: 7\ndata:{\"b\":\n"
        "data: 2}\n\n"
        'data: {"c": "é中"}\r\r'
        "data: [DONE]\n\n"
    ).encode()
    expected = ['{"a": 1}', '{"b":\n2}', '{"c": "é中"}', "[DONE]"]
    # every split point, including inside multi-byte characters and between \r and \n
    for cut in range(len(stream) + 1):
        parser = SSEParser()
        events = parser.feed(stream[:cut]) + parser.feed(stream[cut:]) + parser.finish()
        assert events == expected, cut
    # byte-by-byte
    parser = SSEParser()
    events = [e for b in stream for e in parser.feed(bytes([b]))] + parser.finish()
    assert events == expected


def test_sse_parser_flushes_last_event_without_blank_line():
    parser = SSEParser()
    assert parser.feed(b"data: x\n\ndata: y") == ["x"]
    assert parser.finish() == ["y"]


def test_chunk_text_for_completions_and_chat():
    assert chunk_text({"choices": [{"text": "ab"}]}) == "ab"
    assert chunk_text({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == ""
    assert chunk_text({"choices": [{"delta": {"content": "hi"}}]}) == "hi"
    assert chunk_text({"choices": [{"delta": {"reasoning_content": "hmm"}}]}) == "hmm"
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""


def test_account_tokens_with_usage_on_every_chunk():
    events = [
        ChunkEvent(0.005, False, 0),  # chat role chunk: no token yet, not the first token
        ChunkEvent(0.010, True, 1),
        ChunkEvent(0.020, False, 2),  # a token that ends mid UTF-8 character: empty text
        ChunkEvent(0.050, True, 5),  # three tokens coalesced into one chunk
        ChunkEvent(0.051, False, 5, has_choices=False),  # final usage-only chunk
    ]
    times, tokens, total, source = account_tokens(events, 5)
    assert times == [0.010, 0.020, 0.050]
    assert tokens == [1.0, 1.0, 3.0]
    assert (total, source) == (5, "usage-per-chunk")


def test_account_tokens_with_final_usage_only_spreads_tokens():
    events = [ChunkEvent(0.01, True), ChunkEvent(0.02, False), ChunkEvent(0.03, True),
              ChunkEvent(0.04, False, 6, has_choices=False)]
    times, tokens, total, source = account_tokens(events, 6)
    assert times == [0.01, 0.03] and tokens == [3.0, 3.0]
    assert (total, source) == (6, "usage-final")
    times, tokens, total, source = account_tokens(events[:3], None)
    assert tokens == [1.0, 1.0] and (total, source) == (2, "chunks")


# --------------------------------------------------------------------------- workload / CLI


def test_len_distributions():
    rng = random.Random(0)
    assert parse_len_dist("fixed:12")(rng) == 12
    uni = [parse_len_dist("uniform:32:256")(rng) for _ in range(500)]
    assert min(uni) >= 32 and max(uni) <= 256 and len(set(uni)) > 50
    norm = [parse_len_dist("normal:100:20")(rng) for _ in range(2000)]
    assert abs(sum(norm) / len(norm) - 100) < 3 and min(norm) >= 1
    for bad in ("uniform:5", "uniform:9:3", "zipf:1:2", "normal:a:b", "fixed:0"):
        with pytest.raises(ValueError):
            parse_len_dist(bad)


def test_build_payload_shapes():
    cfg = BenchConfig(endpoint="chat", output_len=16, extra_body={"temperature": 0})
    body = build_payload(cfg, "m", "hello")
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    assert body["max_tokens"] == 16 and body["ignore_eos"] is True and body["temperature"] == 0
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    cfg = BenchConfig(endpoint="completions", stream=False, ignore_eos=False, output_len=8)
    body = build_payload(cfg, "m", "hello")
    assert body["prompt"] == "hello" and "ignore_eos" not in body and "stream_options" not in body


def test_prompts_follow_calibration():
    from rayllm_app.bench.workload import Calibration

    cfg = BenchConfig(input_len=100, seed=3)
    prompts = plan_prompts(cfg, 5, Calibration(intercept=10.0, tokens_per_word=1.5))
    assert all(len(p.split()) == 60 for p in prompts)  # (100 - 10) / 1.5
    assert len(set(prompts)) == 5  # distinct prompts: no shared-prefix cache artefacts


def test_cli_arguments_and_configs():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([
        "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--concurrency", "1,4,16",
        "--num-requests", "8", "--endpoint", "chat", "--no-stream", "--input-len-dist", "uniform:8:16",
        "--output-len", "32", "--max-duration", "5", "--label", "bare", "--no-progress",
    ])
    configs = bench.configs_from_args(args)
    assert [c.concurrency for c in configs] == [1, 4, 16]
    assert [c.label for c in configs] == ["bare c=1", "bare c=4", "bare c=16"]
    c = configs[0]
    assert (c.endpoint, c.stream, c.output_len, c.max_duration, c.progress) == ("chat", False, 32, 5.0, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--concurrency", "a,b"])
    bad = parser.parse_args(["--request-rate", "-1", "--no-progress"])
    assert bench.run(bad) == 2


# --------------------------------------------------------------------------- load loop (scripted server)


class ScriptedServer:
    """An aiohttp app speaking just enough of the OpenAI streaming API to exercise the loop.

    ``coalesce`` tokens are sent per chunk with usage only at the end; ``delay`` is the
    time per chunk; every ``fail_every``-th request gets HTTP 503.
    """

    def __init__(self, delay=0.002, coalesce=1, fail_every=0, burst=1):
        self.delay, self.coalesce, self.fail_every, self.burst = delay, coalesce, fail_every, burst
        self.count = 0
        self.max_inflight = 0
        self.inflight = 0

    async def completions(self, request):
        body = await request.json()
        self.count += 1
        if self.fail_every and self.count % self.fail_every == 0:
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        n = body.get("max_tokens", 4)
        usage = {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": n}
        if not body.get("stream"):
            await asyncio.sleep(self.delay * n)
            return web.json_response({"choices": [{"text": "x" * n}], "usage": usage})
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            per_chunk = (body.get("stream_options") or {}).get("continuous_usage_stats") and self.burst > 1
            sent = 0
            while sent < n:
                await asyncio.sleep(self.delay)
                if per_chunk:  # `burst` one-token events with running usage, in one write
                    out = ""
                    for _ in range(min(self.burst, n - sent)):
                        sent += 1
                        out += f"data: {json.dumps({'choices': [{'text': 'y'}], 'usage': {'completion_tokens': sent}})}\n\n"
                    await resp.write(out.encode())
                    continue
                k = min(self.coalesce, n - sent)
                sent += k
                await resp.write(f"data: {json.dumps({'choices': [{'text': 'x' * k}]})}\n\n".encode())
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
            return resp
        finally:
            self.inflight -= 1

    async def models(self, request):
        return web.json_response({"data": [{"id": "scripted"}]})


async def _serve(script: ScriptedServer):
    app = web.Application()
    app.router.add_post("/v1/completions", script.completions)
    app.router.add_get("/v1/models", script.models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/v1"


def _run_against(script: ScriptedServer, **kw) -> BenchResult:
    async def go():
        runner, url = await _serve(script)
        try:
            return await run_benchmark(BenchConfig(base_url=url, **kw))
        finally:
            await runner.cleanup()

    return asyncio.run(go())


def test_loop_closed_concurrency_coalesced_chunks_and_errors():
    script = ScriptedServer(delay=0.003, coalesce=4, fail_every=5)
    res = _run_against(script, concurrency=3, num_requests=20, output_len=16, input_len=8,
                       warmup_requests=0, calibrate=False, keep_requests=True)
    assert res.config["model"] == "scripted"
    assert res.completed + res.failed == 20 and res.failed == 4
    assert res.errors["first"] == [{"message": "HTTP 503: overloaded", "count": 4}]
    assert script.max_inflight <= 3
    assert res.output_len.min == res.output_len.max == 16 and res.output_len_mismatches == 0
    assert res.token_source == {"usage-final": res.completed}
    # 4 chunks of 4 tokens without per-chunk usage: the final total is spread evenly over
    # the chunks seen (4, or fewer when a busy client reads two writes at once)
    ok = [r for r in res.requests if r["ok"]]
    for r in ok:
        assert sum(r["chunk_tokens"]) == pytest.approx(16)
        assert len(set(r["chunk_tokens"])) == 1 and len(r["chunk_tokens"]) <= 4
    assert res.itl_ms.count == sum(round(t) for r in ok for t in r["chunk_tokens"][1:])
    assert res.ttft_ms.p50 > 0 and res.ttft_ms.p50 <= res.ttft_ms.p99


class ModelsSeen(ScriptedServer):
    """Records each request's ``model`` in arrival order."""

    def __init__(self):
        super().__init__()
        self.seen = []

    async def completions(self, request):
        self.seen.append((await request.json())["model"])
        return await super().completions(request)


def test_models_are_cycled_per_request_and_calibration_goes_to_model():
    assert request_models(BenchConfig(models=["a", "b"]), "m", 3) == ["a", "b", "a"]
    assert request_models(BenchConfig(), "m", 2) == ["m", "m"]
    script = ModelsSeen()
    res = _run_against(script, model="cal", models=["a", "b", "c"], concurrency=1, num_requests=5,
                       output_len=2, input_len=8, warmup_requests=2, calibrate=True)
    assert res.completed == 5 and res.config["models"] == ["a", "b", "c"]
    assert script.seen == ["cal", "cal", "a", "b", "a", "b", "c", "a", "b"]
    script = ModelsSeen()
    _run_against(script, models=["x", "y"], concurrency=1, num_requests=2, output_len=2, warmup_requests=0)
    assert script.seen == ["x", "x", "x", "y"]  # no --model: the first of --models is calibrated
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.configs_from_args(parser.parse_args(["--models", "b:1,b:2", "--no-progress"]))[0].models == ["b:1", "b:2"]
    assert bench.configs_from_args(parser.parse_args(["--no-progress"]))[0].models == []


def test_events_of_one_network_read_form_one_chunk():
    res = _run_against(ScriptedServer(delay=0.004, burst=4), concurrency=2, num_requests=6, output_len=12,
                       input_len=8, warmup_requests=0, calibrate=False, keep_requests=True)
    assert res.completed == 6 and res.token_source == {"usage-per-chunk": 6}
    assert res.total_output_tokens == 72
    # each write of 4 one-token events is one chunk of 4 tokens (a busy client may read
    # two writes at once: 8), and each gap is spread over the tokens it carried
    for r in res.requests:
        assert sum(r["chunk_tokens"]) == 12 and all(t % 4 == 0 for t in r["chunk_tokens"])
    assert res.itl_ms.count == sum(int(t) for r in res.requests for t in r["chunk_tokens"][1:])
    assert res.chunk_gap_ms.count == sum(len(r["chunk_tokens"]) - 1 for r in res.requests)


def test_loop_open_poisson_and_nonstreaming():
    res = _run_against(ScriptedServer(), request_rate=200.0, concurrency=0, num_requests=12, output_len=4,
                       stream=False, warmup_requests=1, calibrate=True)
    assert res.completed == 12 and res.failed == 0
    assert res.ttft_ms.count == 0 and res.e2e_ms.count == 12
    assert res.config["calibration"]["tokens_per_word"] == pytest.approx(1.0)
    assert res.input_len.mean == pytest.approx(128, abs=1)


def test_loop_is_bounded_by_max_duration():
    script = ScriptedServer(delay=0.05)
    t0 = time.perf_counter()
    res = _run_against(script, concurrency=2, num_requests=1000, output_len=40, max_duration=0.5,
                       drain_timeout=0.3, warmup_requests=0, calibrate=False)
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0
    assert res.completed == 0 and res.cancelled == 2 and res.num_requests == 2
    assert "cancelled at the time limit" in markdown_report([res])


# --------------------------------------------------------------------------- smoke run (real server)


@pytest.mark.e2e
def test_smoke_against_real_server(openai_server):
    """~8 requests at concurrency 2: streaming chat, then non-streaming completions."""
    common = dict(base_url=openai_server.base_url, model=openai_server.model, concurrency=2,
                  api_key=getattr(openai_server, "api_key", None),
                  num_requests=8, input_len=32, output_len=16, ignore_eos=True, warmup_requests=1,
                  max_duration=120, request_timeout=120)
    chat = asyncio.run(run_benchmark(BenchConfig(endpoint="chat", stream=True, **common)))
    comp = asyncio.run(run_benchmark(BenchConfig(endpoint="completions", stream=False, **common)))
    for res in (chat, comp):
        assert res.failed == 0 and res.cancelled == 0, res.errors
        assert res.completed == 8
        assert res.output_len.min == res.output_len.max == 16
        assert res.total_output_tokens == 8 * 16 and res.output_len_mismatches == 0
        assert res.input_len.min > 0
        assert res.request_throughput > 0 and res.output_throughput > 0
        assert 0 < res.e2e_ms.p50 <= res.e2e_ms.p99
    assert chat.ttft_ms.count == 8 and 0 < chat.ttft_ms.p50 <= chat.ttft_ms.p99
    assert chat.ttft_ms.p99 <= chat.e2e_ms.max
    assert chat.itl_ms.count > 0 and 0 <= chat.itl_ms.p50 <= chat.itl_ms.p99
    assert chat.token_source.get("usage-per-chunk", 0) + chat.token_source.get("usage-final", 0) == 8
    assert comp.ttft_ms.count == 0
    assert not math.isnan(comp.output_throughput)
    md = markdown_report([chat, comp])
    assert "| chat | yes | 2 |" in md and "| completions | no | 2 |" in md


def _benchmark_script(name: str):
    """A script of benchmarks/ (not a package) loaded as a module."""
    import importlib.util
    from pathlib import Path

    folder = str(Path(__file__).resolve().parents[2] / "benchmarks")
    if folder not in sys.path:  # as when run as a script: its siblings import each other
        sys.path.insert(0, folder)
    path = Path(folder) / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_decode_steps_groups_gaps_by_active_streams():
    """benchmarks/decode_steps.py: gaps keyed by concurrent streams; prefill stalls left out."""
    decode_steps = _benchmark_script("decode_steps")

    alone = RequestRecord(0, True, start=0.0, chunk_times=[0.0, 0.05, 0.10])          # alone until t=1.0
    together = [RequestRecord(1, True, start=1.0, chunk_times=[0.0, 0.1, 0.2, 1.2]),  # last gap: a 1 s stall
                RequestRecord(2, True, start=1.0, chunk_times=[0.0, 0.1, 0.2])]
    grouped = decode_steps.decode_gaps_by_active([alone, *together], bucket=1)
    assert sorted(grouped) == [1, 2]
    assert grouped[1] == pytest.approx([0.05, 0.05])
    assert grouped[2] == pytest.approx([0.1, 0.1, 0.1, 0.1])


def test_core_share_sums_time_per_thread_and_counts_preemptions():
    """benchmarks/core_share.py on `perf script` lines: who held each core, who preempted whom."""
    core_share = _benchmark_script("core_share")

    def switch(cpu: int, ts: float, prev: int, state: str, nxt: int) -> str:
        return (f"  comm {prev} [{cpu:03d}] {ts:.6f}: sched:sched_switch: prev_comm=a prev_pid={prev} prev_prio=120 "
                f"prev_state={state} ==> next_comm=b next_pid={nxt} next_prio=120")

    lines = [
        switch(0, 10.0, 0, "R", 100),    # the worker starts on CPU 0
        switch(0, 10.9, 100, "R", 200),  # preempted by 200 (still runnable)
        switch(0, 11.0, 200, "S", 100),  # 200 sleeps, the worker runs again
        switch(0, 12.0, 100, "R+", 200),
        switch(1, 10.0, 0, "R", 300),
        switch(1, 11.0, 300, "S", 0),    # a voluntary sleep is no preemption
        switch(1, 12.0, 0, "R", 300),
        "not a switch line",
    ]
    shares = core_share.parse_switches(lines)
    assert shares.span_s == pytest.approx(2.0)
    assert shares.held[0][100] == pytest.approx(1.9) and shares.held[0][200] == pytest.approx(0.1)
    assert shares.top_thread(0) == 100 and shares.top_thread(1) == 300
    assert shares.preempted_by[100] == {200: 2}
    assert 300 not in shares.preempted_by
    text = core_share.report(shares, {100: "VLLM::Worker (pid 100)"}, top=3)
    assert "CPU 0: top thread VLLM::Worker (pid 100) held 95.0%, preempted 2 times (1/s)" in text
    assert "idle" in text and "tid 200 (exited)" in text


def test_a_stream_keeps_its_text_only_when_asked():
    """A chat's next turn sends the answer back (benchmarks/routing.py's multi-turn)."""
    import aiohttp

    from rayllm_app.bench.client import send_request

    async def go():
        runner, url = await _serve(ScriptedServer(coalesce=2))
        body = {"model": "scripted", "prompt": "a b", "max_tokens": 5, "stream": True}
        try:
            async with aiohttp.ClientSession() as session:
                kept = await send_request(session, f"{url}/completions", body, index=0, run_start=0.0,
                                          stream=True, keep_text=True)
                plain = await send_request(session, f"{url}/completions", body, index=1, run_start=0.0, stream=True)
        finally:
            await runner.cleanup()
        return kept, plain

    kept, plain = asyncio.run(go())
    assert kept.ok and kept.text == "xxxxx" and kept.output_tokens == 5
    assert plain.ok and plain.text is None

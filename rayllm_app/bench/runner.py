"""``rayllm bench``: a load generator for any OpenAI-compatible server.

Closed loop (``--concurrency N`` workers each send their next request when the last one
finished) or open loop (``--request-rate R``: Poisson arrivals, ``--concurrency`` then
caps the requests in flight); streaming or not; ``/completions`` or ``/chat/completions``.
Every run is bounded by ``--num-requests`` and by ``--max-duration`` (no request starts
after it; requests still running ``--drain-timeout`` later are cancelled and reported).

Library use::

    from rayllm_app.bench import BenchConfig, run_benchmark
    result = asyncio.run(run_benchmark(BenchConfig(base_url=..., model=..., concurrency=4)))
    print(result.output_throughput, result.ttft_ms.p50)

See ``rayllm_app/bench/report.py`` for the exact definition of every metric.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as _dt
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import aiohttp

from rayllm_app.bench.client import send_request
from rayllm_app.bench.report import (
    BenchResult,
    ProgressLine,
    RequestRecord,
    Stats,
    markdown_report,
    summarize,
)
from rayllm_app.bench.workload import (
    DEFAULT_BASE_URL,
    BenchConfig,
    build_payload,
    calibrate,
    discover_model,
    endpoint_url,
    load_tokenizer,
    parse_len_dist,
    plan_prompts,
    request_models,
)

__all__ = [
    "BenchConfig",
    "BenchResult",
    "Stats",
    "add_arguments",
    "main",
    "parse_len_dist",
    "run",
    "run_benchmark",
]


async def run_benchmark(config: BenchConfig) -> BenchResult:
    """Run one load test as configured and return its aggregate result."""
    cfg = config
    cfg.validate()
    pool = cfg.concurrency if cfg.concurrency > 0 else 0  # 0 = aiohttp: unlimited
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    connector = aiohttp.TCPConnector(limit=pool, limit_per_host=pool)
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        model = cfg.model or (cfg.models[0] if cfg.models else await discover_model(session, cfg))
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
        fit = None
        if cfg.calibrate and (cfg.input_len or cfg.input_len_dist):
            fit = await calibrate(session, cfg, model, tokenizer)
        prompts = plan_prompts(cfg, cfg.num_requests + cfg.warmup_requests, fit, tokenizer)
        url = endpoint_url(cfg)
        warm = prompts[: cfg.warmup_requests]
        warm_models = request_models(cfg, model, len(warm))
        if warm:  # unmeasured; bounded by --max-duration as a whole
            width = max(1, min(len(warm), cfg.concurrency or len(warm)))

            async def warmup() -> None:
                for i in range(0, len(warm), width):
                    await asyncio.gather(*(
                        send_request(session, url, build_payload(cfg, name, p), index=-1,
                                     run_start=time.perf_counter(), stream=cfg.stream)
                        for name, p in zip(warm_models[i : i + width], warm[i : i + width])
                    ))

            try:
                await asyncio.wait_for(warmup(), timeout=cfg.max_duration)
            except asyncio.TimeoutError:
                pass
        measured = prompts[cfg.warmup_requests :]
        payloads = [build_payload(cfg, name, p)
                    for name, p in zip(request_models(cfg, model, len(measured)), measured)]
        started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        records, cancelled, duration = await _drive(session, url, payloads, cfg)
    conf = cfg.public_dict()
    conf["model"] = model
    conf["calibration"] = dataclasses.asdict(fit) if fit else None
    label = cfg.label or (f"c={cfg.concurrency}" if cfg.request_rate is None else f"rate={cfg.request_rate}")
    return summarize(
        records,
        label=label,
        config=conf,
        started_at=started_at,
        duration_s=duration,
        num_requests=len(records) + cancelled,
        cancelled=cancelled,
        expected_output_len=cfg.output_len if cfg.ignore_eos else None,
        keep_requests=cfg.keep_requests,
    )


async def _drive(session, url: str, payloads: list[dict], cfg: BenchConfig):
    """The load loop. Returns (records, cancelled count, duration seconds)."""
    records: list[RequestRecord] = []
    inflight: set[int] = set()
    state = {"failed": 0, "tokens": 0}
    t0 = time.perf_counter()
    deadline = t0 + cfg.max_duration
    label = cfg.label or ("closed c=%d" % cfg.concurrency if cfg.request_rate is None else f"rate {cfg.request_rate}/s")
    progress = ProgressLine(len(payloads), label=label, enabled=cfg.progress)

    async def one(i: int) -> None:
        inflight.add(i)
        try:
            rec = await send_request(session, url, payloads[i], index=i, run_start=t0, stream=cfg.stream)
            records.append(rec)
            if rec.ok:
                state["tokens"] += rec.output_tokens or 0
            else:
                state["failed"] += 1
        finally:
            inflight.discard(i)
        progress.update(len(records), state["failed"], len(inflight), state["tokens"])

    tasks: list[asyncio.Task] = []
    if cfg.request_rate is None:
        next_index = iter(range(len(payloads)))

        async def worker() -> None:
            for i in next_index:  # shared iterator: each index is taken once
                if time.perf_counter() >= deadline:
                    return
                await one(i)

        tasks = [asyncio.create_task(worker()) for _ in range(min(cfg.concurrency, len(payloads)))]
    else:
        rng = random.Random(cfg.seed + 1)
        sem = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency > 0 else None

        async def limited(i: int) -> None:
            if sem is None:
                return await one(i)
            async with sem:
                if time.perf_counter() < deadline:
                    await one(i)

        async def arrivals() -> None:
            when = t0
            for i in range(len(payloads)):
                if i and not math.isinf(cfg.request_rate):
                    when += rng.expovariate(cfg.request_rate)
                if when >= deadline:
                    return
                delay = when - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(limited(i)))

        tasks = [asyncio.create_task(arrivals())]

    hard_stop = deadline + cfg.drain_timeout
    try:
        while True:
            pending = [t for t in tasks if not t.done()]
            if not pending:
                break
            remaining = hard_stop - time.perf_counter()
            if remaining <= 0:
                break
            await asyncio.wait(pending, timeout=min(remaining, 0.25), return_when=asyncio.FIRST_COMPLETED)
            progress.update(len(records), state["failed"], len(inflight), state["tokens"])
    finally:
        cancelled = len(inflight)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        progress.update(len(records), state["failed"], 0, state["tokens"], force=True)
        progress.close()
    duration = time.perf_counter() - t0
    if not cancelled and records:  # end at the last completion, not at loop bookkeeping
        duration = max(r.start + (r.e2e or 0) for r in records)
    return records, cancelled, duration


# --------------------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


def _json_obj(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--extra-body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--extra-body must be a JSON object")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``rayllm bench`` options to ``parser``."""
    d = BenchConfig()
    env_url = os.environ.get("RAYLLM_BASE_URL", DEFAULT_BASE_URL)
    env_key = os.environ.get("RAYLLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    g = parser.add_argument_group("target")
    g.add_argument("--base-url", default=env_url, help=f"OpenAI-compatible base URL (default {env_url})")
    g.add_argument("--model", default=None, help="model id (default: first of GET /models)")
    g.add_argument("--models", type=lambda t: [m for m in t.split(",") if m], default=[],
                   help="comma list: request i goes to the i-th in turn (e.g. adapters of one base); "
                        "--model, default the first, gets the calibration requests")
    g.add_argument("--api-key", default=env_key, help="bearer token (default $RAYLLM_API_KEY or $OPENAI_API_KEY)")
    g.add_argument("--endpoint", choices=("completions", "chat"), default=d.endpoint)
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=d.stream,
                   help="streaming responses (default: on)")
    g = parser.add_argument_group("load")
    g.add_argument("--concurrency", type=_int_list, default=[d.concurrency],
                   help="closed-loop workers; a comma list runs one run each (e.g. 1,4,16). "
                        "With --request-rate: cap on requests in flight (0 = none)")
    g.add_argument("--num-requests", type=int, default=d.num_requests, help="requests per run")
    g.add_argument("--request-rate", type=float, default=None,
                   help="open loop: Poisson arrivals at this many requests/s (inf = all at once)")
    g.add_argument("--max-duration", type=float, default=d.max_duration,
                   help="seconds after which no request starts (default %(default)s)")
    g.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                   help="seconds after --max-duration before in-flight requests are cancelled")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout)
    g.add_argument("--warmup-requests", type=int, default=d.warmup_requests, help="unmeasured, before each run")
    g.add_argument("--seed", type=int, default=d.seed)
    g = parser.add_argument_group("request shape")
    g.add_argument("--input-len", type=int, default=d.input_len, help="prompt tokens (approximate, calibrated)")
    g.add_argument("--input-len-dist", default=None,
                   help="prompt length distribution: fixed:N, uniform:LO:HI or normal:MEAN:STD")
    g.add_argument("--output-len", type=int, default=d.output_len, help="max_tokens per request")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=d.ignore_eos,
                   help="send ignore_eos so every request generates exactly --output-len tokens")
    g.add_argument("--continuous-usage", action=argparse.BooleanOptionalAction, default=d.continuous_usage,
                   help="request stream_options.continuous_usage_stats to count tokens per chunk")
    g.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=d.calibrate,
                   help="measure the server's tokens per prompt word first (2 requests)")
    g.add_argument("--tokenizer", default=None,
                   help="local tokenizer folder: cut every prompt to the exact --input-len")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--extra-body", type=_json_obj, default={}, help="JSON object merged into each request")
    g = parser.add_argument_group("output")
    g.add_argument("--label", default="", help="run label in the table (default c=N)")
    g.add_argument("--output-json", type=Path, default=None)
    g.add_argument("--output-md", type=Path, default=None)
    g.add_argument("--save-requests", action="store_true", help="keep per-request records in the JSON")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress line on stderr (default: when stderr is a terminal)")
    g.add_argument("--fail-on-error", action="store_true", help="exit 1 when any request failed")


def configs_from_args(args: argparse.Namespace) -> list[BenchConfig]:
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    out = []
    levels = args.concurrency
    for conc in levels:
        label = args.label
        if label and len(levels) > 1:
            label = f"{label} c={conc}"
        out.append(BenchConfig(
            base_url=args.base_url, model=args.model, models=args.models, api_key=args.api_key,
            endpoint=args.endpoint, stream=args.stream, concurrency=conc, num_requests=args.num_requests,
            request_rate=args.request_rate, max_duration=args.max_duration,
            drain_timeout=args.drain_timeout, request_timeout=args.request_timeout,
            input_len=args.input_len, input_len_dist=args.input_len_dist, output_len=args.output_len,
            ignore_eos=args.ignore_eos, continuous_usage=args.continuous_usage, calibrate=args.calibrate,
            tokenizer=args.tokenizer,
            warmup_requests=args.warmup_requests, seed=args.seed, temperature=args.temperature,
            extra_body=args.extra_body, label=label, progress=progress, keep_requests=args.save_requests,
        ))
    return out


def write_outputs(results: list[BenchResult], json_path: Path | None, md_path: Path | None) -> str:
    report = markdown_report(results)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"runs": [r.to_dict() for r in results]}, indent=2) + "\n")
    if md_path:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(report)
    return report


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rayllm bench``; returns the process exit code."""
    try:
        configs = configs_from_args(args)
        for cfg in configs:
            cfg.validate()
    except ValueError as exc:
        print(f"rayllm bench: {exc}", file=sys.stderr)
        return 2
    results: list[BenchResult] = []
    for cfg in configs:
        try:
            results.append(asyncio.run(run_benchmark(cfg)))
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            print(f"rayllm bench: {cfg.base_url}: {type(exc).__name__}: {exc}", file=sys.stderr)
            if results:
                write_outputs(results, args.output_json, args.output_md)
            return 1
    print(write_outputs(results, args.output_json, args.output_md), end="")
    if any(r.completed == 0 for r in results):
        return 1
    if args.fail_on_error and any(r.failed or r.cancelled for r in results):
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayllm bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

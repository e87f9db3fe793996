"""The load of benchmarks/gpu_compare.py: per level, a closed loop of streamed /v1/completions
from several forked client processes with a common start, their raw samples merged into one
`rayllm bench` result.

Several processes, because one asyncio client near a full core would be measuring itself, not
the server; their raw samples, not per-process percentiles, are merged, so the percentiles are
over all requests and tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import datetime as _dt
import multiprocessing as mp
import random
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from rayllm_app.bench import BenchConfig, BenchResult  # noqa: E402
from rayllm_app.bench.client import send_request  # noqa: E402
from rayllm_app.bench.report import RequestRecord, summarize  # noqa: E402
from rayllm_app.bench.workload import build_payload, endpoint_url  # noqa: E402


def token_range(vocab: int) -> tuple[int, int]:
    """Token ids for random prompts: away from the special tokens at the vocabulary's
    start and the rarely trained ids at its end (1000..vocab-1000 for SmolLM2's 49152)."""
    margin = min(1000, vocab // 8)
    return margin, vocab - margin


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    """A fresh prompt of token ids: every request differs, so no prefix-cache hits."""
    lo, hi = token_range(vocab)
    return [rng.randrange(lo, hi) for _ in range(length)]


def request_body(cfg: BenchConfig, rng: random.Random, vocab: int) -> dict[str, Any]:
    """`rayllm bench`'s request (build_payload: stream, usage, ignore_eos, temperature),
    with a token-id prompt of --input-len instead of words."""
    body = build_payload(cfg, cfg.model or "", "")
    body["prompt"] = random_prompt(rng, cfg.input_len or 1, vocab)
    return body


def shares(concurrency: int, procs: int) -> list[int]:
    """Streams per client process: ``concurrency`` split as evenly as possible."""
    procs = max(1, min(procs, concurrency))
    return [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]


async def _closed_loop(cfg: BenchConfig, streams: int, seed: int, vocab: int,
                       t_start: float) -> tuple[list[RequestRecord], int]:
    """``streams`` closed-loop request loops until t_start + duration; loops still in a
    request at duration + drain are cancelled (each counts one cancelled request)."""
    rng = random.Random(seed)
    url = endpoint_url(cfg)
    deadline = t_start + cfg.max_duration
    records: list[RequestRecord] = []

    async def loop(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            body = request_body(cfg, rng, vocab)
            records.append(await send_request(session, url, body, index=len(records), run_start=t_start,
                                              stream=True))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=cfg.request_timeout)) as session:
        await asyncio.sleep(max(0.0, t_start - time.perf_counter()))
        tasks = [asyncio.create_task(loop(session)) for _ in range(streams)]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline + cfg.drain_timeout - time.perf_counter()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return records, len(pending)


def client_process(cfg: BenchConfig, streams: int, seed: int, vocab: int,
                   t_start: float) -> tuple[list[RequestRecord], int, float]:
    """One client process: its records, cancelled count and CPU seconds (a client near a
    full core would be measuring itself, not the server)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's cleanup handler
    cpu0 = time.process_time()
    records, cancelled = asyncio.run(_closed_loop(cfg, streams, seed, vocab, t_start))
    return records, cancelled, time.process_time() - cpu0


def makespan(records: list[RequestRecord], cancelled: int, elapsed: float) -> float:
    """Seconds from the common start to the last completion (all of ``elapsed`` when some
    requests were cancelled at the drain limit)."""
    ends = [r.start + (r.e2e or 0.0) for r in records]
    end = max(ends, default=elapsed)
    return max(end, elapsed) if cancelled else end


def merge(parts: list[tuple[list[RequestRecord], int, float]], cfg: BenchConfig, elapsed: float,
          started_at: str) -> tuple[BenchResult, float]:
    """The client processes' raw samples as one `rayllm bench` result (percentiles over all
    requests and tokens, out tok/s over the makespan), and the busiest client's CPU share."""
    records = [r for p in parts for r in p[0]]
    cancelled = sum(p[1] for p in parts)
    duration = makespan(records, cancelled, elapsed)
    result = summarize(records, label=cfg.label, config=cfg.public_dict(), started_at=started_at,
                       duration_s=duration, num_requests=len(records) + cancelled, cancelled=cancelled,
                       expected_output_len=cfg.output_len)
    busiest = max((p[2] for p in parts), default=0.0) / max(elapsed, 1e-9)
    return result, busiest


def run_level(cfg: BenchConfig, vocab: int, procs: int) -> tuple[BenchResult, float]:
    """One closed-loop level from ``procs`` forked client processes with a common start."""
    split = shares(cfg.concurrency, procs)
    t_start = time.perf_counter() + 0.5 + 0.05 * len(split)  # CLOCK_MONOTONIC: one clock for all
    started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with cf.ProcessPoolExecutor(len(split), mp_context=mp.get_context("fork")) as pool:
        futures = [pool.submit(client_process, cfg, n, cfg.seed * 1_000_003 + k, vocab, t_start)
                   for k, n in enumerate(split)]
        parts = [f.result() for f in futures]
    return merge(parts, cfg, time.perf_counter() - t_start, started_at)


def warmup(cfg: BenchConfig, vocab: int, count: int) -> int:
    """A few short unmeasured requests at once (the level's first requests would otherwise
    pay for idle caches and connections); returns how many failed."""
    if count < 1:
        return 0
    short = replace(cfg, output_len=16)
    rng = random.Random(cfg.seed - 1)

    async def send() -> list[RequestRecord]:
        timeout = aiohttp.ClientTimeout(total=cfg.request_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return await asyncio.gather(*(
                send_request(session, endpoint_url(cfg), request_body(short, rng, vocab), index=-1,
                             run_start=time.perf_counter(), stream=True) for _ in range(count)))

    return sum(1 for r in asyncio.run(send()) if not r.ok)


def level_config(args: argparse.Namespace, base_url: str, level: int, round_no: int, stack: str) -> BenchConfig:
    """The level's load as a `rayllm bench` config. The seed depends on round and level
    only, so every stack gets the same prompts within a round."""
    return BenchConfig(base_url=base_url, model=args.served_name, endpoint="completions", stream=True,
                       concurrency=level, max_duration=args.duration, drain_timeout=args.drain,
                       request_timeout=args.request_timeout, input_len=args.input_len,
                       output_len=args.output_len, ignore_eos=True, temperature=0.0,
                       continuous_usage=args.continuous_usage, calibrate=False, seed=1000 * round_no + level,
                       label=f"{stack} c={level} r{round_no}")


def measurement(result: BenchResult, *, stack: str, level: int, round_no: int, procs: int,
                client_busy: float, warmup_failed: int) -> dict[str, Any]:
    """The results.jsonl fields of one (stack, level, round)."""
    def pick(stats: Any, *names: str) -> dict[str, float | None]:
        return {n: None if getattr(stats, n) is None else round(getattr(stats, n), 2) for n in names}

    return {"stack": stack, "level": level, "round": round_no,
            "out_tok_s": round(result.output_throughput, 1), "req_s": round(result.request_throughput, 3),
            "ttft_ms": pick(result.ttft_ms, "p50", "p90", "p99"), "itl_ms": pick(result.itl_ms, "p50", "p90", "p99"),
            "e2e_ms": pick(result.e2e_ms, "p50", "p90"), "tpot_ms": pick(result.tpot_ms, "p50"),
            "ok": result.completed, "errors": result.failed, "cancelled": result.cancelled,
            "err_sample": [e["message"] for e in result.errors["first"][:3]],
            "output_len_mismatches": result.output_len_mismatches, "tokens_per_chunk": result.tokens_per_chunk,
            "duration_s": round(result.duration_s, 2), "procs": procs, "client_busy_max": round(client_busy, 2),
            "warmup_failed": warmup_failed}

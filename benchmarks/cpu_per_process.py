"""Where the CPU goes: one `rayllm bench` run, and the CPU seconds every process used meanwhile.

On a 2-core machine the serving layer competes with vLLM's engine for the same cores, so
"CPU per output token" of the router and the model replica (against bare vLLM's API server)
is the number that predicts throughput. Used for `benchmarks/results/*-optimisations.md`.

    .venv/bin/python benchmarks/cpu_per_process.py --base-url http://127.0.0.1:8000/v1 \\
        --model tiny-llama --concurrency 64 --num-requests 512 [--output-len 64] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def cpu_snapshot() -> dict[int, tuple[float, str]]:
    snapshot = {}
    for process in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            times = process.cpu_times()
            name = " ".join(process.info["cmdline"] or [process.info["name"] or "?"])
            snapshot[process.pid] = (times.user + times.system, name[:100])
        except psutil.Error:
            continue
    return snapshot


def add_load_arguments(parser: argparse.ArgumentParser, *, concurrency: int) -> None:
    """The one `rayllm bench` run these measurement scripts drive (see bench_command)."""
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, default=concurrency)
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--tokenizer", default=None, help="local tokenizer folder for exact prompt lengths")


def bench_command(args: argparse.Namespace, output_json: Path) -> list[str]:
    """`rayllm bench` with the load of add_load_arguments, its results written to output_json."""
    cmd = [sys.executable, "-m", "rayllm_app.cli", "bench", "--base-url", args.base_url, "--model", args.model,
           "--concurrency", str(args.concurrency), "--num-requests", str(args.num_requests),
           "--input-len", str(args.input_len), "--output-len", str(args.output_len),
           "--no-progress", "--output-json", str(output_json)]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    return cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser, concurrency=16)
    parser.add_argument("--top", type=int, default=8, help="processes to list")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        cmd = bench_command(args, out)
        before, started = cpu_snapshot(), time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall, after = time.monotonic() - started, cpu_snapshot()
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return 1
        run = json.loads(out.read_text())["runs"][0]
    tokens = run["total_output_tokens"]
    print(f"c={args.concurrency}: {run['output_throughput']:.0f} out tok/s, TTFT p50 {run['ttft_ms']['p50']:.1f} ms, "
          f"ITL p50 {run['itl_ms']['p50']:.2f} ms, {run['completed']} requests, {tokens} tokens in "
          f"{run['duration_s']:.1f} s (wall incl. client start {wall:.1f} s)")
    rows = sorted(((cpu - before.get(pid, (0.0, ""))[0], pid, name) for pid, (cpu, name) in after.items()),
                  reverse=True)
    for used, pid, name in rows[:args.top]:
        if used < 0.05:
            break
        print(f"{used:7.2f} s  {1e6 * used / max(tokens, 1):6.0f} us/token  {pid:>7}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

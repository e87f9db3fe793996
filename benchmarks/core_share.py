"""Who holds each CPU core during a load run: the kernel's context switches, summed per thread.

Why: on a CPU machine the serving layer shares cores with vLLM's worker (the model's forward
pass) and engine core (the scheduler), and both busy-poll, so their CPU seconds say little.
What matters is how much of each core they kept and how often another thread preempted
them. This records the scheduler's `sched:sched_switch` tracepoint with `perf` (root, or
`kernel.perf_event_paranoid` <= 1) for a window in the middle of one `rayllm bench` run.

    .venv/bin/python benchmarks/core_share.py --base-url http://127.0.0.1:8000/v1 \\
        --model SmolLM2-135M-Instruct --concurrency 64 --num-requests 128 [--trace-after 30 --trace-for 20]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cpu_per_process import add_load_arguments, bench_command  # a sibling script (benchmarks/)

SWITCH = re.compile(r"\[(\d+)\]\s+([\d.]+): sched:sched_switch: prev_comm=.*? prev_pid=(\d+) prev_prio=\d+ "
                    r"prev_state=(\S+) ==> next_comm=.*? next_pid=(\d+) ")
IDLE_TID = 0


@dataclass
class CoreShares:
    """Time each thread held each core, and who took the core from a thread still runnable."""

    span_s: float = 0.0
    held: dict[int, collections.Counter] = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    preempted_by: dict[int, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))

    def top_thread(self, cpu: int) -> int | None:
        busy = [(held, tid) for tid, held in self.held[cpu].items() if tid != IDLE_TID]
        return max(busy)[1] if busy else None


def parse_switches(lines: list[str]) -> CoreShares:
    shares, running = CoreShares(), {}
    first = last = None
    for line in lines:
        match = SWITCH.search(line)
        if not match:
            continue
        cpu, ts = int(match.group(1)), float(match.group(2))
        prev_tid, prev_state, next_tid = int(match.group(3)), match.group(4), int(match.group(5))
        first = ts if first is None else first
        last = ts
        if cpu in running:
            tid, since = running[cpu]
            shares.held[cpu][tid] += ts - since
        running[cpu] = (next_tid, ts)
        if prev_state.startswith("R"):  # switched out while it still wanted to run
            shares.preempted_by[prev_tid][next_tid] += 1
    shares.span_s = (last - first) if first is not None else 0.0
    return shares


def thread_names() -> dict[int, str]:
    """tid -> "comm (pid N) command line" for every thread now."""
    out = subprocess.run(["ps", "-eLo", "pid=,tid=,comm=,args="], capture_output=True, text=True).stdout
    names = {}
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 3:
            names[int(parts[1])] = f"{parts[2]} (pid {parts[0]}) {parts[3][:60] if len(parts) > 3 else ''}".rstrip()
    return names


def report(shares: CoreShares, names: dict[int, str], top: int) -> str:
    def name(tid: int) -> str:
        return "idle" if tid == IDLE_TID else names.get(tid, f"tid {tid} (exited)")

    lines = [f"traced {shares.span_s:.1f} s"]
    for cpu in sorted(shares.held):
        total = sum(shares.held[cpu].values()) or 1.0
        holder = shares.top_thread(cpu)
        preemptions = sum(shares.preempted_by[holder].values()) if holder is not None else 0
        lines.append(f"\nCPU {cpu}: top thread {name(holder)} held {100 * shares.held[cpu][holder] / total:.1f}%, "
                     f"preempted {preemptions} times ({preemptions / max(shares.span_s, 1e-9):.0f}/s)")
        for tid, held in shares.held[cpu].most_common(top):
            lines.append(f"  {100 * held / total:6.2f}%  {name(tid)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser, concurrency=64)
    parser.add_argument("--trace-after", type=float, default=30.0, help="seconds into the run to start tracing")
    parser.add_argument("--trace-for", type=float, default=20.0, help="seconds to trace")
    parser.add_argument("--top", type=int, default=10, help="threads to list per core")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        run_json, perf_data, bench_log = (Path(tmp) / name for name in ("run.json", "perf.data", "bench.log"))
        # The client's messages go to a file: a pipe nobody reads while perf records could fill up.
        with bench_log.open("w") as log:
            bench = subprocess.Popen(bench_command(args, run_json), stdout=subprocess.DEVNULL, stderr=log)
        launched = time.monotonic()
        try:
            time.sleep(args.trace_after)
            names = thread_names()
            traced = subprocess.run(["perf", "record", "-q", "-a", "-e", "sched:sched_switch", "-o", str(perf_data),
                                     "sleep", str(args.trace_for)], capture_output=True, text=True)
            bench.wait(timeout=3600)
            finished = time.monotonic()
        finally:
            if bench.poll() is None:
                bench.kill()
        errors = bench_log.read_text()
        if traced.returncode != 0:
            print(f"perf record failed (root or kernel.perf_event_paranoid <= 1 needed): {traced.stderr[-500:]}",
                  file=sys.stderr)
            return 1
        if bench.returncode != 0:
            print(errors[-2000:], file=sys.stderr)
            return 1
        script = subprocess.run(["perf", "script", "-i", str(perf_data)], capture_output=True, text=True)
        run = json.loads(run_json.read_text())["runs"][0]
    load_from = finished - run["duration_s"] - launched  # the client starts up first
    if load_from > args.trace_after or finished - launched < args.trace_after + args.trace_for:
        print(f"warning: the load ran from {load_from:.0f} to {finished - launched:.0f} s after launch; the trace "
              f"({args.trace_after:g} to {args.trace_after + args.trace_for:g} s) was not inside it: raise "
              "--num-requests or move --trace-after", file=sys.stderr)
    print(f"c={args.concurrency}: {run['output_throughput']:.1f} out tok/s, ITL p50 {run['itl_ms']['p50']:.1f} ms, "
          f"p90 {run['itl_ms']['p90']:.1f} ms, TTFT p50 {run['ttft_ms']['p50']:.0f} ms")
    print(report(parse_switches(script.stdout.splitlines()), names, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())

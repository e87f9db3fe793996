"""Decode-step gaps from a saved `rayllm bench` run, grouped by how many streams were active.

Why: at high concurrency a stream's inter-token latency is the engine's step time, and a
stack can show a lower ITL p50 only because its engine ran fewer sequences per step (or
bunched its prefills into a few long steps). Grouping each token gap by the number of
streams active at that moment separates the engine's pace from the batch it was given.

Usage: rayllm bench ... --save-requests --output-json run.json
       python benchmarks/decode_steps.py run.json [more.json ...]
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
from pathlib import Path
from typing import Any

PREFILL_STALL_S = 0.3  # longer gaps are waits behind other requests' prefills, not decode steps


def load_run(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    run = data["runs"][0] if "runs" in data else data
    if not run.get("requests"):
        raise SystemExit(f"{path}: no per-request records; run `rayllm bench` with --save-requests")
    return run


def decode_gaps_by_active(run: dict[str, Any], bucket: int = 4) -> dict[int, list[float]]:
    """Token gaps (seconds) keyed by the active-stream count at the gap's start, in buckets."""
    starts: list[float] = []
    ends: list[float] = []
    gaps: list[tuple[float, float]] = []
    for record in run["requests"]:
        times = [record["start"] + t for t in record["chunk_times"]]
        if len(times) < 2:
            continue
        starts.append(times[0])
        ends.append(times[-1])
        gaps.extend((a, b - a) for a, b in zip(times, times[1:]) if b - a <= PREFILL_STALL_S)
    starts.sort()
    ends.sort()
    grouped: dict[int, list[float]] = {}
    for at, gap in gaps:
        active = bisect.bisect_right(starts, at) - bisect.bisect_right(ends, at)
        grouped.setdefault(active // bucket * bucket, []).append(gap)
    return grouped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--bucket", type=int, default=4, help="active-stream bucket width")
    args = parser.parse_args()
    for path in args.runs:
        grouped = decode_gaps_by_active(load_run(path), args.bucket)
        every = [gap for gaps in grouped.values() for gap in gaps]
        print(f"{path}: {len(every)} decode gaps, median {1000 * statistics.median(every):.1f} ms")
        for active in sorted(grouped):
            gaps = grouped[active]
            print(f"  {active:3d}-{active + args.bucket - 1:<3d} active: {len(gaps):6d} gaps, "
                  f"median {1000 * statistics.median(gaps):6.1f} ms")


if __name__ == "__main__":
    main()

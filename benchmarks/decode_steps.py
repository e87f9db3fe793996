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
from collections.abc import Sequence
from pathlib import Path

from rayllm_app.bench.report import RequestRecord

PREFILL_STALL_S = 0.3  # longer gaps are waits behind other requests' prefills, not decode steps


def load_runs(path: Path) -> list[tuple[str, list[RequestRecord]]]:
    """Each run of a `rayllm bench --output-json` file: its label and request records."""
    runs = json.loads(path.read_text())["runs"]
    if not all(run.get("requests") for run in runs):
        raise SystemExit(f"{path}: no per-request records; run `rayllm bench` with --save-requests")
    return [(run["label"], [RequestRecord(**r) for r in run["requests"]]) for run in runs]


def decode_gaps_by_active(records: Sequence[RequestRecord], bucket: int = 4) -> dict[int, list[float]]:
    """Token gaps (seconds) keyed by the active-stream count at the gap's start, in buckets."""
    starts: list[float] = []
    ends: list[float] = []
    gaps: list[tuple[float, float]] = []
    for record in records:
        if len(record.chunk_times) < 2:
            continue
        starts.append(record.start + record.chunk_times[0])
        ends.append(record.start + record.chunk_times[-1])
        gaps.extend((record.start + at, gap) for at, gap in zip(record.chunk_times, record.chunk_gaps())
                    if gap <= PREFILL_STALL_S)
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
        for label, records in load_runs(path):
            grouped = decode_gaps_by_active(records, args.bucket)
            every = [gap for gaps in grouped.values() for gap in gaps]
            print(f"{path} ({label}): {len(every)} decode gaps, median {1000 * statistics.median(every):.1f} ms")
            for active in sorted(grouped):
                gaps = grouped[active]
                print(f"  {active:3d}-{active + args.bucket - 1:<3d} active: {len(gaps):6d} gaps, "
                      f"median {1000 * statistics.median(gaps):6.1f} ms")


if __name__ == "__main__":
    main()

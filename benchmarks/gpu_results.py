"""The record of a gpu_compare.py run: ``DIR/results.jsonl``, appended an event at a time, and
read back.

benchmarks/gpu_compare.py writes it as it measures (a later call polls it; a killed run keeps
what it measured) and reads it back for ``--resume``; gpu_report.py makes the summary from it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable


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

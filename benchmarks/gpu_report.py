"""The report of benchmarks/gpu_compare.py: results.jsonl aggregated over rounds (per stack and
level the median and its range, throughput relative to bare), written as summary.json,
summary.md and summary.png.

It reads only results.jsonl, so ``gpu_compare.py --report DIR`` redoes it from a fetched run on
a machine without the GPU.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_report import plot  # noqa: E402
from benchmarks.compare_stacks import PEERS, stack_order  # noqa: E402
from benchmarks.gpu_results import read_rows  # noqa: E402
from benchmarks.gpu_stacks import API2, BASELINE, STACKS  # noqa: E402


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

"""The comparison report of ``compare_stacks.py``: markdown tables, the target check, the plot.

Reads the report dict ``compare_stacks.py`` writes as JSON, so a report can be redrawn from
a saved run (``compare_stacks.py --plot JSON PNG``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayllm_app.bench import BenchResult  # noqa: E402
from rayllm_app.bench.report import markdown_report  # noqa: E402

PEER_STACKS = ("ray-serve-llm", "ray-serve-llm-fast")


def _ms(v):
    return "n/a" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.1f}")


def _load_cell(load: dict | None) -> str:
    if not load:
        return "-"
    return f"{load['cpu_busy_before']:.0%}, {load['load1_before']:.1f} / {load['load1_after']:.1f}"


def _spread(load: dict | None) -> str:
    repeats = (load or {}).get("repeats") or []
    if len(repeats) < 2:
        return "-"
    values = [r["out_tok_s"] for r in repeats]
    return f"{min(values):,.0f}-{max(values):,.0f}"


def comparison_table(report: dict) -> str:
    lines = [
        "| stack | conc | req/s | out tok/s | vs bare | runs (out tok/s) | TTFT p50 ms | TTFT vs bare "
        "| TTFT p99 ms | ITL p50 ms | TPOT p50 ms | E2E p50 ms | E2E p99 ms | ok / err | host load |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    bare = {r["config"]["concurrency"]: r for r in report["stacks"].get("bare", {}).get("runs", [])}
    for stack, entry in report["stacks"].items():
        if entry["status"] != "ok":
            lines.append(f"| {stack} | - | - | - | - | - | - | - | - | - | - | - | - | {entry['status']} | - |")
            continue
        for r in entry["runs"]:
            c = r["config"]["concurrency"]
            base = bare.get(c)
            rel = f"{100 * r['output_throughput'] / base['output_throughput']:.0f}%" if base else "-"
            ttft_rel = (f"{r['ttft_ms']['p50'] / base['ttft_ms']['p50']:.2f}x"
                        if base and base["ttft_ms"]["p50"] and r["ttft_ms"]["p50"] else "-")
            load = entry.get("host_load", {}).get(str(c))
            lines.append(
                f"| {stack} | {c} | {r['request_throughput']:.2f} | {r['output_throughput']:.0f} | {rel} "
                f"| {_spread(load)} | {_ms(r['ttft_ms']['p50'])} | {ttft_rel} | {_ms(r['ttft_ms']['p99'])} "
                f"| {_ms(r['itl_ms']['p50'])} | {_ms(r['tpot_ms']['p50'])} | {_ms(r['e2e_ms']['p50'])} "
                f"| {_ms(r['e2e_ms']['p99'])} | {r['completed']} / {r['failed'] + r['cancelled']} "
                f"| {_load_cell(load)} |"
            )
    return "\n".join(lines)


TARGET_METRICS = (("out tok/s", lambda r: r["output_throughput"], True),
                  ("TTFT p50", lambda r: r["ttft_ms"]["p50"], False),
                  ("TTFT p99", lambda r: r["ttft_ms"]["p99"], False),
                  ("ITL p50", lambda r: r["itl_ms"]["p50"], False),
                  ("E2E p50", lambda r: r["e2e_ms"]["p50"], False),
                  ("E2E p99", lambda r: r["e2e_ms"]["p99"], False))


def target_table(report: dict) -> str:
    """rayllm-app against the issue's target: >= 90% of bare throughput, TTFT p50 <= 1.5x
    bare, and better than each Ray Serve LLM stack on every metric."""
    stacks = report["stacks"]
    ours = {r["config"]["concurrency"]: r for r in stacks.get("rayllm-app", {}).get("runs", [])}
    bare = {r["config"]["concurrency"]: r for r in stacks.get("bare", {}).get("runs", [])}
    peers = [p for p in PEER_STACKS if stacks.get(p, {}).get("runs")]
    if not ours or not bare:
        return ""
    lines = ["| conc | throughput vs bare (>= 90%) | TTFT p50 vs bare (<= 1.5x) | "
             + " | ".join(f"beats {p} on" for p in peers) + " |",
             "|--:|--:|--:|" + "---|" * len(peers)]
    for c, r in sorted(ours.items()):
        b = bare.get(c)
        if b is None:
            continue
        share = r["output_throughput"] / b["output_throughput"]
        ttft = r["ttft_ms"]["p50"] / b["ttft_ms"]["p50"] if b["ttft_ms"]["p50"] else float("nan")
        cells = [f"{share:.0%} {'ok' if share >= 0.9 else 'short'}", f"{ttft:.2f}x {'ok' if ttft <= 1.5 else 'short'}"]
        for p in peers:
            peer = {x["config"]["concurrency"]: x for x in stacks[p]["runs"]}.get(c)
            if peer is None:
                cells.append("-")
                continue
            won, lost = [], []
            for name, value, higher_is_better in TARGET_METRICS:
                a, z = value(r), value(peer)
                if a is None or z is None:
                    continue
                (won if (a > z if higher_is_better else a < z) else lost).append(name)
            cells.append(f"{len(won)}/{len(won) + len(lost)}" + (f" (not: {', '.join(lost)})" if lost else ""))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(report: dict, path: Path, png_name: str | None) -> None:
    meta = report["meta"]
    load = meta["load"]
    rounds = load.get("rounds", 1)
    runs_per_level = rounds * load.get("repeat", 1)
    out = [
        f"# Serving stacks on one CPU machine: {meta['model_id']} ({meta['date']})",
        "",
        f"Machine: {meta['machine']}. Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.",
        "",
        f"Each stack was started alone on `{meta['model_path']}` with the same vLLM engine arguments "
        f"`{json.dumps(meta['engine_kwargs'])}`, loaded, and stopped before the next one"
        + (f"; that was done in {rounds} rounds, each starting with the next stack, so every stack ran "
           "early and late in the run and the host's drifting background load falls on all alike"
           if rounds > 1 else "") + ". Load: "
        f"`rayllm bench`, {'streaming' if load['stream'] else 'non-streaming'} {load['endpoint']}, "
        f"prompts of ~{load['input_len']} tokens, {load['output_len']} output tokens per request "
        f"(`ignore_eos`), closed loop at concurrency {', '.join(map(str, load['concurrency']))} with "
        f"{load['requests']} requests per level after a short warm-up, each level run "
        f"{runs_per_level} times in all; the table shows the run with the median throughput and the "
        "range of all runs.",
        "",
        comparison_table(report),
        "",
        "*vs bare*: output-token throughput relative to bare vLLM at the same concurrency. "
        f"*host load*: how busy the {os.cpu_count()} CPUs were just before the level (our server "
        "idle), then the 1-minute load average before / after it; the machine is shared, and a busy "
        "host or a load well above the core count means disturbed numbers. "
        "ITL is per token (a chunk's gap divided by the tokens it carried), TPOT is "
        "(last token - first token) / (tokens - 1) per request; see `rayllm_app/bench/report.py`.",
    ]
    target = target_table(report)
    if target:
        out += ["", "### rayllm-app against the target", "", target, "",
                "Metrics compared with each Ray Serve LLM stack: " + ", ".join(m[0] for m in TARGET_METRICS)
                + " (higher throughput, lower latencies)."]
    if png_name:
        out += ["", f"![throughput and TTFT vs concurrency]({png_name})"]
    out += ["", "## Stacks", ""]
    for stack, entry in report["stacks"].items():
        line = f"- **{stack}**: {entry['status']}"
        startups = entry.get("startup_s")
        if isinstance(startups, (int, float)):
            startups = [startups]
        if startups:
            line += f", ready {', '.join(f'{s:.0f}' for s in startups)} s after launch"
        if entry.get("reason"):
            line += f" - {entry['reason']}"
        out.append(line)
        out.append(f"  - command: `{' '.join(entry.get('command', [])) or 'n/a'}`")
    for stack, entry in report["stacks"].items():
        if entry.get("runs"):
            out += ["", markdown_report([BenchResult.from_dict(r) for r in entry["runs"]],
                                        title=f"{stack}: harness detail").rstrip()]
    path.write_text("\n".join(out) + "\n")


def plot(report: dict, png: Path) -> None:
    """Throughput and TTFT p50 vs concurrency, one line per stack (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - used as matplotlib.ticker

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stack, entry in report["stacks"].items():
        runs = entry.get("runs") or []
        if not runs:
            continue
        conc = [r["config"]["concurrency"] for r in runs]
        ax1.plot(conc, [r["output_throughput"] for r in runs], marker="o", label=stack)
        ax2.plot(conc, [r["ttft_ms"]["p50"] for r in runs], marker="o", label=stack)
    levels = sorted({r["config"]["concurrency"] for e in report["stacks"].values() for r in e.get("runs") or []})
    for ax, title, unit in ((ax1, "Output token throughput", "tokens / s"), (ax2, "TTFT p50", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels or [1])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("concurrency (closed loop)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax2.set_yscale("log")
    meta = report["meta"]
    fig.suptitle(f"{meta['model_id']}, {meta['load']['output_len']} output tokens, {meta['date']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)

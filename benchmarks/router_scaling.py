"""Router scale-out (issue 17): do N routers carry about N times one router's load, and what does
a router cost per streamed token?

A local multi-node Ray cluster on loopback: ``--nodes`` nodes started with ``ray start``, each
with the fast path's variables in its environment (as the KubeRay pods have them), so Ray's
HAProxy runs on every node, on a port of its own (``RAY_SERVE_WORKER_PROXY_HTTP_PORT``: the nodes
share one host). One model, deployed once; the router deployment is redeployed at each count of
``--routers`` in rotating rounds, one router per node at most (``args.router.max_per_node``),
while the model replica stays. The load, a closed loop of short streamed completions, comes from
``--clients`` forked processes, each on one node's HAProxy port (an external load balancer's
job). Per run: requests/s, output tok/s, TTFT p50/p90, and the CPU seconds of the routers, HAProxy
and the model replica (with its engine) per 1,000 streamed tokens, from every process's CPU
times before and after.

    .venv/bin/python benchmarks/router_scaling.py --model-yaml /tmp/m/1b.yaml --nodes 4 --routers 1,2,4
    .venv/bin/python benchmarks/router_scaling.py --smoke     # tiny model, CPU, 2 nodes, 1 and 2 routers

Results: ``benchmarks/results/<date>-router-scaling[-tag].{md,json,png}``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from rayllm_app.config.router_settings import FAST_PATH_ENV  # noqa: E402
from rayllm_app.ports import free_port  # noqa: E402

NODE_ENV = {**FAST_PATH_ENV, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0", "RAY_worker_niceness": "0",
            "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_SERVE_HAPROXY_NBTHREAD": "1"}  # one HAProxy per node already
APP = "rayllm"
MODEL_TITLE = "ray::ServeReplica:rayllm:model-"
ROUTER_TITLE = "ray::ServeReplica:rayllm:router"


def log(msg: str) -> None:
    print(f"[routers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the cluster


def host_gpus() -> int:
    """NVIDIA GPUs on this host (``nvidia-smi -L``), 0 without the tool."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listed.splitlines() if line.startswith("GPU "))


class LoopbackCluster:
    """``ray start`` nodes on 127.0.0.1 with private ports; HAProxy on each at ``http_ports[i]``."""

    def __init__(self, workdir: Path, nodes: int, cpus: int, gpus_on_head: int) -> None:
        self.workdir = workdir
        self.temp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # short: socket paths
        self.gcs_port = free_port()
        self.http_ports = [free_port() for _ in range(nodes)]
        self.procs: list[subprocess.Popen] = []
        for index in range(nodes):
            self._start(index, cpus, gpus_on_head if index == 0 else 0)
            if index == 0:
                self._wait_gcs()

    def _start(self, index: int, cpus: int, gpus: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(NODE_ENV)
        env.update({"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()), "RAY_AUTH_MODE": "disabled"})
        if index:
            env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(self.http_ports[index])
        args = [f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp}",
                "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        args += (["--head", f"--port={self.gcs_port}", "--include-dashboard=false",
                  f"--ray-client-server-port={free_port()}"] if index == 0
                 else [f"--address=127.0.0.1:{self.gcs_port}"])
        out = open(self.workdir / f"ray-node{index}.log", "w")
        ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]  # no console script on the GPU machines
        self.procs.append(subprocess.Popen([*ray_cli, "start", "--block", *args],
                                           env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    def _wait_gcs(self) -> None:
        import socket

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.gcs_port)) == 0:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"the head's GCS did not listen within 90 s (see {self.workdir}/ray-node0.log)")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def stop(self) -> None:
        import signal

        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            proc.wait(timeout=30)
        for leftover in psutil.process_iter(["cmdline"]):  # HAProxy and workers re-parented to init
            try:
                if str(self.temp) in " ".join(leftover.info["cmdline"] or ()) or \
                        "haproxy-serve" in " ".join(leftover.info["cmdline"] or ()):
                    leftover.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


# --------------------------------------------------------------------------- serving


def deploy(configs: list, routers: int, http_port: int) -> list[str]:
    """The app with ``routers`` router replicas, one per node at most; the model deployment's
    arguments do not change, so Serve keeps its replica. Returns the nodes the routers run on."""
    from ray import serve

    from rayllm_app.app import build_app_from_configs
    from rayllm_app.config.router_settings import RouterSettings

    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    serve.run(build_app_from_configs(configs, settings=RouterSettings(replicas=routers, max_per_node=1)), name=APP,
              route_prefix="/", blocking=False)
    return deploy_nodes()


def deploy_nodes() -> list[str]:
    """The nodes (id prefixes) the running routers are on."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    replicas = details["applications"][APP]["deployments"]["router"]["replicas"]
    return sorted(r["node_id"][:8] for r in replicas if str(r.get("state")).endswith("RUNNING"))


def routers_answering(ports: list[int], want: int, timeout_s: float = 180) -> list[int]:
    """Once ``want`` routers answer /health through the nodes' HAProxy: the ports that answer
    (Serve runs HAProxy on the head and on nodes with replicas; the load goes to those)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    while time.monotonic() < deadline:
        seen, live = set(), []
        for port in ports:
            for _ in range(3 * want):
                try:
                    seen.add(httpx.get(f"http://127.0.0.1:{port}/health", timeout=10,
                                       headers={"connection": "close"}).json()["router"])
                    if port not in live:
                        live.append(port)
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
        if len(seen) == want:
            return live
        time.sleep(2)
    raise RuntimeError(f"{want} routers did not all answer within {timeout_s:.0f} s (saw {len(seen)})")


def cluster_processes(roots: list[int]) -> list[psutil.Process]:
    """Every process under these ``ray start`` processes: this cluster's, not another Ray's on
    the same host (a test session's, say), whose routers have the same title."""
    found: list[psutil.Process] = []
    for pid in roots:
        try:
            found += psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            continue
    return found


def cpu_by_role(roots: list[int]) -> dict[str, float]:
    """CPU seconds so far of this cluster's routers, HAProxy and model replicas (with their
    engines); also each router process's own, under ``router:<pid>``."""
    totals = {"router": 0.0, "haproxy": 0.0, "model": 0.0}
    for proc in cluster_processes(roots):
        try:
            title = " ".join(proc.cmdline())
            role = ("router" if title.startswith(ROUTER_TITLE) else "haproxy" if "haproxy" in proc.name()
                    else "model" if title.startswith(MODEL_TITLE) else None)
            if role is None:
                continue
            times = proc.cpu_times()
            totals[role] += times.user + times.system
            if role == "router":
                totals[f"router:{proc.pid}"] = times.user + times.system
            if role == "model":
                for child in proc.children(recursive=True):
                    child_times = child.cpu_times()
                    totals["model"] += child_times.user + child_times.system
        except psutil.Error:
            continue
    return totals


# --------------------------------------------------------------------------- load


def spread_level(cfg, ports: list[int], clients: int, vocab: int):
    """One closed-loop run from ``clients`` forked processes, client k on node k's port."""
    from benchmarks.gpu_load import client_process, merge, shares

    split = shares(cfg.concurrency, clients)
    t_start = time.perf_counter() + 0.5 + 0.05 * len(split)
    started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with cf.ProcessPoolExecutor(len(split), mp_context=mp.get_context("fork")) as pool:
        futures = [pool.submit(client_process, replace(cfg, base_url=f"http://127.0.0.1:{ports[k % len(ports)]}/v1"),
                               n, cfg.seed * 1_000_003 + k, vocab, t_start) for k, n in enumerate(split)]
        parts = [f.result() for f in futures]
    return merge(parts, cfg, time.perf_counter() - t_start, started_at)


# --------------------------------------------------------------------------- report


def summary_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for routers in sorted({r["routers"] for r in runs}):
        mine = sorted((r for r in runs if r["routers"] == routers), key=lambda r: r["out_tok_s"])
        rows.append({**mine[len(mine) // 2], "runs": len(mine),
                     "out_tok_s_range": [mine[0]["out_tok_s"], mine[-1]["out_tok_s"]]})
    base = rows[0]["req_s"] if rows else 0.0
    for row in rows:
        row["scaling"] = round(row["req_s"] / base, 2) if base else None
    return rows


def write_markdown(report: dict, path: Path, png_name: str | None) -> None:
    meta = report["meta"]
    lines = [f"# Router scale-out, {meta['date']}{' (smoke)' if meta['smoke'] else ''}", "",
             meta["setup"], "", f"Machine: {meta['machine']}. Commit {meta['commit']}.", "",
             "| routers | req/s | scaling | out tok/s (range) | TTFT p50 / p90 ms | router CPU ms per 1k tok "
             "| router busy (per router) | HAProxy ms per 1k tok | model+engine ms per 1k tok | errors | runs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["summary"]:
        lines.append(f"| {r['routers']} | {r['req_s']:.1f} | {r['scaling']}x | {r['out_tok_s']:.0f} "
                     f"({r['out_tok_s_range'][0]:.0f}-{r['out_tok_s_range'][1]:.0f}) | {r['ttft_p50_ms']:.0f} / "
                     f"{r['ttft_p90_ms']:.0f} | {r['router_ms_per_1k']:.1f} | {r['router_busy']:.0%} | "
                     f"{r['haproxy_ms_per_1k']:.1f} | {r['model_ms_per_1k']:.1f} | {r['errors']} | {r['runs']} |")
    lines += ["", "Scaling: requests/s against one router, same model replica, same load. Router busy: the "
              "routers' CPU seconds over the run's wall time, per router (1.0 = one core).", ""]
    if png_name:
        lines += [f"![router scaling]({png_name})", ""]
    lines += ["Command: `" + " ".join(report["command"]) + "`", ""]
    path.write_text("\n".join(lines))


def plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    counts = [r["routers"] for r in rows]
    axes[0].plot(counts, [r["req_s"] for r in rows], "o-", label="measured")
    axes[0].plot(counts, [rows[0]["req_s"] * c / counts[0] for c in counts], "--", label="linear")
    axes[0].set(xlabel="router replicas", ylabel="requests/s", title="Load carried")
    axes[0].legend()
    axes[1].bar([str(c) for c in counts], [r["router_ms_per_1k"] for r in rows])
    axes[1].set(xlabel="router replicas", ylabel="router CPU ms per 1,000 tokens", title="Router cost per token")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-yaml", type=Path, default=None, help="the model (default: the tiny random Llama, CPU)")
    p.add_argument("--nodes", type=int, default=None, help="Ray nodes on loopback (default 4; --smoke 2)")
    p.add_argument("--cpus-per-node", type=int, default=None, help="logical CPUs per node (default 8)")
    p.add_argument("--routers", default=None, help="router counts, comma list (default 1,2,4; --smoke 1,2)")
    p.add_argument("--rounds", type=int, default=None, help="(default 2; --smoke 1)")
    p.add_argument("--concurrency", type=int, default=None, help="streams in flight (default 256; --smoke 8)")
    p.add_argument("--clients", type=int, default=None, help="client processes (default 8; --smoke 2)")
    p.add_argument("--duration", type=float, default=None, help="seconds per run (default 30; --smoke 6)")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help=argparse.SUPPRESS)
    p.add_argument("--tag", default=None)
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/rayllm-bench/router-scaling"))
    args = p.parse_args(argv)
    defaults = {"nodes": (4, 2), "cpus_per_node": (8, 8), "routers": ("1,2,4", "1,2"), "rounds": (2, 1),
                "concurrency": (256, 8), "clients": (8, 2), "duration": (30.0, 6.0)}
    for name, (full, smoke) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    args.routers = [int(x) for x in str(args.routers).split(",")]
    if args.results_dir is None:
        args.results_dir = args.workdir / "smoke" if args.smoke else ROOT / "benchmarks" / "results"
    return args


def model_configs(args) -> list:
    from rayllm_app.config import load_model_configs

    if args.model_yaml is not None:
        return load_model_configs([args.model_yaml])
    from rayllm_app.config.loader import parse_model_config
    from rayllm_app.storage.tiny_model import build_tiny_llama

    path = build_tiny_llama(args.workdir / "tiny")
    return [parse_model_config({
        "deployment_config": {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 512,
                              "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        "engine_config": {"model_id": "tiny-routers", "hf_model_id": str(path), "max_total_tokens": 512,
                          "engine_kwargs": {"dtype": "float32", "enforce_eager": True,
                                            "kv_cache_memory_bytes": 64 * 1024 * 1024, "max_num_seqs": 64}},
        "scaling_config": {"num_workers": 1, "num_gpus_per_worker": 0, "num_cpus_per_worker": 1}},
        "tiny-routers")]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        plot(json.loads(Path(args.plot[0]).read_text()), Path(args.plot[1]))
        return 0
    os.environ.update(NODE_ENV)  # this process builds the handles the routers get
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    configs = model_configs(args)
    model = configs[0].model_id
    # The head node gets every GPU of the host when the model asks for any (replicas may take
    # fractions of one, several replicas one each); the other nodes get none.
    gpus = host_gpus() if configs[0].scaling_config.num_gpus_per_worker else 0
    import ray
    from ray import serve

    from benchmarks.gpu_compare import commit
    from rayllm_app.bench import BenchConfig

    log(f"starting {args.nodes} Ray nodes on loopback")
    cluster = LoopbackCluster(args.workdir, args.nodes, args.cpus_per_node, gpus)
    runs: list[dict] = []
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(configs[0].engine_config.model_source))
        order = list(args.routers)
        for round_no in range(args.rounds):
            for routers in order[round_no % len(order):] + order[:round_no % len(order)]:
                t0 = time.monotonic()
                deploy(configs, routers, cluster.http_ports[0])
                ports = routers_answering(cluster.http_ports, routers)
                nodes = deploy_nodes()
                log(f"{routers} router(s) up in {time.monotonic() - t0:.0f} s, on nodes {nodes}; "
                    f"{len(ports)} of {len(cluster.http_ports)} nodes' HAProxy answer")
                cfg = BenchConfig(base_url="", model=model, endpoint="completions", stream=True,
                                  concurrency=args.concurrency, max_duration=args.duration, drain_timeout=30,
                                  request_timeout=120, input_len=args.input_len, output_len=args.output_len,
                                  ignore_eos=True, temperature=0.0, calibrate=False, seed=round_no + 1,
                                  label=f"{routers} routers r{round_no + 1}")
                from benchmarks.gpu_load import warmup

                warmup(replace(cfg, base_url=f"http://127.0.0.1:{cluster.http_ports[0]}/v1"), vocab, 16)
                roots = [proc.pid for proc in cluster.procs]
                before, wall0 = cpu_by_role(roots), time.monotonic()
                result, client_busy = spread_level(cfg, ports, args.clients, vocab)
                after, wall = cpu_by_role(roots), time.monotonic() - wall0
                tokens = max(result.total_output_tokens, 1)
                used = {role: after[role] - before.get(role, 0.0) for role in after}
                per_router = sorted(round(v, 2) for k, v in used.items() if k.startswith("router:"))
                run = {"routers": routers, "round": round_no + 1, "req_s": round(result.request_throughput, 2),
                       "out_tok_s": round(result.output_throughput, 1), "completed": result.completed,
                       "errors": result.failed + result.cancelled, "tokens": result.total_output_tokens,
                       "ttft_p50_ms": result.ttft_ms.p50 or 0.0, "ttft_p90_ms": result.ttft_ms.p90 or 0.0,
                       "router_ms_per_1k": round(1e6 * used["router"] / tokens, 2),
                       "haproxy_ms_per_1k": round(1e6 * used["haproxy"] / tokens, 2),
                       "model_ms_per_1k": round(1e6 * used["model"] / tokens, 2),
                       "router_busy": round(used["router"] / wall / routers, 3), "client_busy_max": client_busy}
                run["router_nodes"] = nodes
                run["ingress_nodes"] = len(ports)
                run["router_cpu_s"] = per_router  # each router process's CPU seconds in the run
                runs.append(run)
                log(f"{routers} router(s): {run['req_s']} req/s, {run['out_tok_s']} tok/s, TTFT p50 "
                    f"{run['ttft_p50_ms']:.0f} ms, router {run['router_ms_per_1k']} ms/1k tok "
                    f"({run['router_busy']:.0%} busy each), {run['errors']} errors")
        serve.shutdown()
    finally:
        ray.shutdown()
        cluster.stop()
    date = _dt.date.today().isoformat()
    model_replicas = configs[0].deployment_config.autoscaling_config.min_replicas
    report = {"meta": {"date": date, "smoke": args.smoke, "commit": commit(None), "machine":
                       f"{platform.node()}, {os.cpu_count()} cores",
                       "setup": (f"{args.nodes} Ray nodes on loopback ({args.cpus_per_node} logical CPUs each), "
                                 f"HAProxy on each; model {model} ({model_replicas} replica(s)); closed loop of {args.concurrency} "
                                 f"streamed completions ({args.input_len} prompt / {args.output_len} output tokens, "
                                 f"ignore_eos) from {args.clients} client processes spread over the nodes' ports, "
                                 f"{args.duration:.0f} s per run, {args.rounds} rotating round(s).")},
              "command": ["benchmarks/router_scaling.py", *(argv if argv is not None else sys.argv[1:])],
              "runs": runs, "summary": summary_rows(runs)}
    stem = f"{date}-router-scaling" + (f"-{args.tag}" if args.tag else "")
    json_path, md_path, png_path = (args.results_dir / f"{stem}.{ext}" for ext in ("json", "md", "png"))
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png_name = None
    try:
        plot(report, png_path)
        png_name = png_path.name
    except ImportError:  # matplotlib lives in the benchmarks' peers venv (benchmarks/compare_stacks.py)
        peers = ROOT / ".bench-venvs" / "peers" / "bin" / "python"
        if peers.exists() and subprocess.run([str(peers), __file__, "--plot", str(json_path), str(png_path)],
                                             capture_output=True).returncode == 0:
            png_name = png_path.name
        else:
            log("matplotlib missing: no plot")
    write_markdown(report, md_path, png_name)
    log(f"wrote {md_path}")
    return 0 if runs and all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Idle sleep on a GPU: how fast a sleeping replica answers, what it holds while asleep, and
whether it serves as fast after a wake (deployment_config.idle_sleep, vLLM's sleep mode).

On a GPU host with the project installed (or the GPU kit's environment, ../shared/gpu)::

    python benchmarks/gpu_sleep.py --model-yaml /tmp/m8b.yaml --after-s 8 --cycles 5

It serves the model with ``rayllm run`` and ``idle_sleep: {after_s, level}``, then:

1. **throughput before**: ``rayllm bench`` at ``--concurrency`` (streamed, ``ignore_eos``);
2. **cycles**: wait until ``/health`` shows the model ``sleeping``, read the GPU's used memory,
   send one streamed request and time its first token (the wake plus a prefill), and read
   the replica's own wake time (``rayllm_wake_seconds_total`` / ``rayllm_wakes_total``) from ``/metrics``;
3. **throughput after**: the same bench again;
4. **stop**: SIGINT to ``rayllm run``, timed to its exit.

``--pair`` instead serves two copies of the model on the one GPU (``num_gpus_per_worker: 0.5``,
``--pair-memory`` of its memory each) and alternates requests between them, each after the
other has fallen asleep: several models on one GPU, and what a switch costs.

Results: JSON and the server's log in ``--out`` (default ``benchmarks/results/<date>-gpu-sleep[-pair].*``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def gpu_memory_mib(index: int) -> int:
    out = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[0])


def model_status(root: str, model: str) -> str:
    try:
        return get_json(f"{root}/health")["models"][model]["status"]
    except Exception:  # noqa: BLE001 - starting
        return "unknown"


def wait_status(root: str, model: str, wanted: str, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if model_status(root, model) == wanted:
            return time.monotonic() - started
        time.sleep(0.2)
    raise RuntimeError(f"{model} not {wanted} within {timeout_s:.0f} s (now {model_status(root, model)})")


def first_token_s(root: str, model: str) -> float:
    body = json.dumps({"model": model, "prompt": "The capital of France is", "max_tokens": 8, "stream": True,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"{root}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        for line in response:
            if line.startswith(b"data: {"):
                return time.perf_counter() - started
    raise RuntimeError("no token")


def wake_seconds(root: str) -> tuple[float, float]:
    """The replicas' exact wake seconds and wakes, summed: (rayllm_wake_seconds_total,
    rayllm_wakes_total) from /metrics. Not the histogram's _sum: Ray's exporter estimates that
    from bucket midpoints."""
    with urllib.request.urlopen(f"{root}/metrics", timeout=30) as response:
        text = response.read().decode()
    total = count = 0.0
    for line in text.splitlines():
        match = re.match(r"rayllm_(wake_seconds|wakes)_total\{[^}]*\} ([0-9.e+-]+)", line)
        if match:
            if match.group(1) == "wake_seconds":
                total += float(match.group(2))
            else:
                count += float(match.group(2))
    return total, count


def bench(base_url: str, model: str, args: argparse.Namespace, label: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        subprocess.run([sys.executable, "-m", "rayllm_app.cli", "bench", "--base-url", base_url, "--model", model,
                        "--endpoint", "completions", "--stream", "--concurrency", str(args.concurrency),
                        "--num-requests", str(args.num_requests), "--input-len", "128", "--output-len", "256",
                        "--ignore-eos", "--warmup-requests", "4", "--label", label, "--no-progress",
                        "--output-json", str(out)], check=True, cwd=ROOT)
        run = json.loads(out.read_text())["runs"][0]
    return {"out_tok_s": round(run["output_throughput"], 1), "ttft_p50_ms": run["ttft_ms"]["p50"],
            "itl_p50_ms": run["itl_ms"]["p50"], "failed": run["failed"]}


def launch(model_files: list[Path], port: int, work: Path) -> subprocess.Popen:
    """``rayllm run`` of these model files, in its own process group, logging to work/serve.log."""
    command = [sys.executable, "-m", "rayllm_app.cli", "run", "--port", str(port)]
    for model_file in model_files:
        command += ["--model", str(model_file)]
    log = open(work / "serve.log", "w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def stop(server: subprocess.Popen, report: dict, work: Path) -> str:
    """SIGINT, as Ctrl-C: the seconds to exit go in the report; SIGKILL after 60 s."""
    started = time.monotonic()
    os.killpg(server.pid, signal.SIGINT)
    try:
        server.wait(60)
        report["stop_s"] = round(time.monotonic() - started, 1)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        report["stop_s"] = None  # did not exit within 60 s
    served_log = (work / "serve.log").read_text()
    # The replica's start timeline (process start, imports, weights, engine): where a start
    # goes. Serve's fast path logs replicas to files only.
    replica_logs = Path(os.environ.get("RAY_TMPDIR", "/tmp/ray")) / "session_latest" / "logs" / "serve"
    report["replica_timings"] = [line[line.index("ready: ") + 7:] for path in sorted(replica_logs.glob("replica_*.log"))
                                 for line in path.read_text(errors="replace").splitlines()
                                 if "Replica of" in line and "ready: " in line]
    return served_log


def with_sleep(config: dict, args: argparse.Namespace, model_id: str | None = None,
               gpu_share: float | None = None) -> dict:
    config = copy.deepcopy(config)
    config.setdefault("deployment_config", {})["idle_sleep"] = {"after_s": args.after_s, "level": args.level}
    if model_id is not None:
        config["engine_config"]["model_id"] = model_id
    if gpu_share is not None:
        config["scaling_config"]["num_gpus_per_worker"] = gpu_share
        engine_kwargs = config["engine_config"].setdefault("engine_kwargs", {})
        engine_kwargs["gpu_memory_utilization"] = args.pair_memory
        # A fixed KV cache: two engines profiling the GPU's free memory at once misjudge it.
        engine_kwargs["kv_cache_memory_bytes"] = int(args.pair_kv_gib * 2**30)
    return config


def run_single(config: dict, args: argparse.Namespace, work: Path, report: dict) -> None:
    config = with_sleep(config, args)
    model = config["engine_config"]["model_id"]
    model_file = work / "model.yaml"
    model_file.write_text(yaml.safe_dump(config))
    root = f"http://127.0.0.1:{args.port}"
    report.update(model=model, idle_sleep=config["deployment_config"]["idle_sleep"], cycles=[])
    server = launch([model_file], args.port, work)
    try:
        report["startup_s"] = round(wait_status(root, model, "ready", args.startup_timeout), 1)
        report["gpu_awake_mib"] = gpu_memory_mib(args.gpu)
        report["before"] = bench(f"{root}/v1", model, args, "before sleep")
        for cycle in range(args.cycles):
            fell_asleep = wait_status(root, model, "sleeping", args.after_s + 120)
            time.sleep(1.0)
            asleep_mib = gpu_memory_mib(args.gpu)
            before = wake_seconds(root)
            ttft = first_token_s(root, model)
            entry = {"cycle": cycle + 1, "asleep_after_s": round(fell_asleep, 1),
                     "gpu_asleep_mib": asleep_mib, "gpu_asleep_above_idle_mib": asleep_mib - report["gpu_idle_mib"],
                     "first_token_after_sleep_s": round(ttft, 3)}
            time.sleep(12)  # the replica's metrics reach /metrics through Ray's exporter
            after = wake_seconds(root)
            if after[1] > before[1]:
                entry["wake_s"] = round((after[0] - before[0]) / (after[1] - before[1]), 3)
            report["cycles"].append(entry)
            print(json.dumps(entry), flush=True)
        report["after"] = bench(f"{root}/v1", model, args, "after wake")
    finally:
        report["served_log"] = stop(server, report, work)
    firsts = [c["first_token_after_sleep_s"] for c in report["cycles"]]
    report["summary"] = {
        "first_token_after_sleep_p50_s": statistics.median(firsts) if firsts else None,
        "gpu_asleep_max_mib": max((c["gpu_asleep_mib"] for c in report["cycles"]), default=None),
        "throughput_after_over_before": round(report["after"]["out_tok_s"] / report["before"]["out_tok_s"], 4)
        if report.get("after") else None,
        "stop_s": report.get("stop_s"),
    }


def run_pair(config: dict, args: argparse.Namespace, work: Path, report: dict) -> None:
    """Two copies of the model share the GPU; requests alternate between them."""
    name = config["engine_config"]["model_id"]
    models = [f"{name}-a", f"{name}-b"]
    files = []
    for model in models:
        files.append(work / f"{model}.yaml")
        files[-1].write_text(yaml.safe_dump(with_sleep(config, args, model, 0.5)))
    root = f"http://127.0.0.1:{args.port}"
    report.update(models=models, pair_memory=args.pair_memory, switches=[])
    server = launch(files, args.port, work)
    try:
        report["startup_s"] = round(max(wait_status(root, m, "ready", args.startup_timeout) for m in models), 1)
        print(json.dumps({"ready_s": report["startup_s"]}), flush=True)
        report["gpu_both_awake_mib"] = gpu_memory_mib(args.gpu)
        for switch in range(2 * args.cycles):
            model, other = models[switch % 2], models[1 - switch % 2]
            wait_status(root, model, "sleeping", args.after_s + 120)
            asleep_mib = gpu_memory_mib(args.gpu)
            ttft = first_token_s(root, model)
            entry = {"switch": switch + 1, "model": model, "other": model_status(root, other),
                     "gpu_before_mib": asleep_mib, "gpu_awake_mib": gpu_memory_mib(args.gpu),
                     "first_token_after_sleep_s": round(ttft, 3)}
            report["switches"].append(entry)
            print(json.dumps(entry), flush=True)
    finally:
        report["served_log"] = stop(server, report, work)
    firsts = [s["first_token_after_sleep_s"] for s in report["switches"]]
    report["summary"] = {
        "first_token_after_switch_p50_s": statistics.median(firsts) if firsts else None,
        "first_token_after_switch_max_s": max(firsts, default=None),
        "gpu_one_awake_max_mib": max((s["gpu_awake_mib"] for s in report["switches"]), default=None),
        "gpu_both_asleep_max_mib": max((s["gpu_before_mib"] for s in report["switches"]
                                        if s["other"] == "sleeping"), default=None),
        "stop_s": report.get("stop_s"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-yaml", type=Path, required=True)
    p.add_argument("--after-s", type=float, default=8.0)
    p.add_argument("--level", type=int, choices=(1, 2), default=1)
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--gpu", type=int, default=0, help="index of the GPU the model runs on")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--pair", action="store_true", help="two copies of the model on the one GPU, alternating")
    p.add_argument("--pair-memory", type=float, default=0.42, help="gpu_memory_utilization of each copy")
    p.add_argument("--pair-kv-gib", type=float, default=16.0, help="KV cache of each copy (GiB)")
    p.add_argument("--out", type=Path, default=None, help="results stem (without suffix)")
    args = p.parse_args(argv)

    config = yaml.safe_load(args.model_yaml.read_text())
    work = Path(tempfile.mkdtemp(prefix="gpu-sleep-"))
    report: dict = {"date": _dt.date.today().isoformat(), "gpu_idle_mib": gpu_memory_mib(args.gpu),
                    "launched_at": time.time()}
    try:
        (run_pair if args.pair else run_single)(config, args, work, report)
    finally:
        served_log = report.pop("served_log", "")
        kind = "gpu-sleep-pair" if args.pair else "gpu-sleep"
        stem = args.out or ROOT / "benchmarks" / "results" / f"{report['date']}-{kind}"
        Path(f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        Path(f"{stem}-serve.log").write_text(served_log[-2_000_000:])
    print(json.dumps(report.get("summary")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

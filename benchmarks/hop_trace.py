"""Where a request's first-token latency goes: per-hop timestamps from every process, lined up.

Start rayllm-app with ``RAYLLM_HOP_TRACE_DIR`` set (see rayllm_app/observability/hop_trace.py),
then run this script on the same host. It sends streamed completions one at a time, notes when
each was sent and when its first bytes came back, and reads the marks the router and the model
replica wrote meanwhile. Every request's hops are its marks in order; the report gives each
hop's p50 and p90. With ``--bare-url`` the same requests alternate with a bare vLLM server, for
the client-side TTFT of both stacks in the same run (blocks of requests in rotating order).

    RAYLLM_HOP_TRACE_DIR=/tmp/hops rayllm run --model models/tiny.yaml --port 8000 &
    python benchmarks/hop_trace.py --base-url http://127.0.0.1:8000 --model tiny-llama \\
        --trace-dir /tmp/hops [--bare-url http://127.0.0.1:8001] --out benchmarks/results/x

One request at a time, so each mark belongs to the request in flight: the script waits
``--gap-ms`` between requests, and the router's marks of a stream's end (after the client's
first byte) fall outside the next request's window.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rayllm_app.bench.report import percentile  # noqa: E402
from rayllm_app.observability.hop_trace import HOPS  # noqa: E402

CLIENT_SENT, CLIENT_FIRST = "client.sent", "client.first_bytes"


def first_bytes_ms(client: httpx.Client, url: str, body: dict) -> tuple[float, float]:
    """Send one streamed request; (sent, first bytes) as wall-clock seconds. Reads it to the end."""
    sent = time.time()
    with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        chunks = response.iter_raw()
        next(chunks)
        first = time.time()
        for _ in chunks:
            pass
    return sent, first


def read_marks(trace_dir: Path) -> list[tuple[float, str]]:
    marks = []
    for path in trace_dir.glob("*.txt"):
        for line in path.read_text().splitlines():
            tag, _, stamp = line.partition(" ")
            if stamp:
                marks.append((float(stamp), tag))
    return sorted(marks)


def hops_of(marks: list[tuple[float, str]], windows: list[tuple[float, float]]) -> dict[str, list[float]]:
    """Each hop's durations (ms) across requests: the time between consecutive marks, in HOPS order."""
    hops: dict[str, list[float]] = {}
    order = (CLIENT_SENT, *HOPS, CLIENT_FIRST)
    index = 0
    for sent, first in windows:
        seen = {CLIENT_SENT: sent, CLIENT_FIRST: first}
        while index < len(marks) and marks[index][0] < sent:
            index += 1
        j = index
        while j < len(marks) and marks[j][0] <= first:
            stamp, tag = marks[j]
            seen.setdefault(tag, stamp)
            j += 1
        present = [tag for tag in order if tag in seen]
        for a, b in zip(present, present[1:]):
            hops.setdefault(f"{a} -> {b}", []).append((seen[b] - seen[a]) * 1000)
    return hops


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(percentile(values, 50), 3), "p90": round(percentile(values, 90), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="rayllm-app, without /v1")
    parser.add_argument("--model", required=True)
    parser.add_argument("--trace-dir", type=Path, required=True, help="the server's RAYLLM_HOP_TRACE_DIR")
    parser.add_argument("--bare-url", default=None, help="a bare vLLM server of the same model, without /v1")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="blocks per stack, in rotating order")
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests before each block")
    parser.add_argument("--prompt-words", type=int, default=120)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--gap-ms", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)

    body = {"model": args.model, "prompt": " ".join(["hello"] * args.prompt_words),
            "max_tokens": args.max_tokens, "stream": True, "ignore_eos": True}
    ours: list[tuple[float, float]] = []
    bare: list[tuple[float, float]] = []
    started = time.monotonic()
    stacks = [(args.base_url, ours), *([(args.bare_url, bare)] if args.bare_url else [])]
    per_block = max(args.requests // args.rounds, 1)
    with httpx.Client(timeout=120) as client:
        for round_index in range(args.rounds):
            # Blocks, not alternating requests: two engines polling on one small host slow each
            # other's idle wake-ups (seen on 2 cores: bare's TTFT went from 13 ms to 950 ms).
            for url, into in stacks[::-1] if round_index % 2 else stacks:
                for i in range(args.warmup + per_block):
                    window = first_bytes_ms(client, url, body)
                    if i >= args.warmup:
                        into.append(window)
                    time.sleep(args.gap_ms / 1000)
    time.sleep(1.0)  # trace files are line-buffered; let the last lines land
    hops = hops_of(read_marks(args.trace_dir), ours)
    result = {
        "requests": len(ours), "prompt_words": args.prompt_words, "max_tokens": args.max_tokens,
        "seconds": round(time.monotonic() - started, 1),
        "ttft_ms": {"rayllm-app": summary([(f - s) * 1000 for s, f in ours])},
        "hops_ms": {name: summary(values) for name, values in hops.items()},
    }
    if bare:
        result["ttft_ms"]["bare"] = summary([(f - s) * 1000 for s, f in bare])
    missing = [name for name, values in hops.items() if len(values) < len(ours)]
    if missing:
        result["incomplete_hops"] = missing  # marks outside a window (or tracing off in a process)
    lines = ["| hop | n | p50 ms | p90 ms |", "|---|--:|--:|--:|"]
    lines += [f"| {name} | {s['n']} | {s['p50']:.3f} | {s['p90']:.3f} |" for name, s in result["hops_ms"].items()]
    lines += ["", "| client TTFT | n | p50 ms | p90 ms |", "|---|--:|--:|--:|"]
    lines += [f"| {name} | {s['n']} | {s['p50']:.3f} | {s['p90']:.3f} |" for name, s in result["ttft_ms"].items()]
    print("\n".join(lines))
    if not hops:
        print(f"no marks in {args.trace_dir}: was the server started with RAYLLM_HOP_TRACE_DIR set?",
              file=sys.stderr)
        return 1
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

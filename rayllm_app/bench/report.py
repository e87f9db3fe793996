"""Statistics, result objects, report rendering and the progress line of ``rayllm bench``.

Kept free of network code so it can be unit-tested with synthetic request records.

Latency metrics (all reported in milliseconds, as mean / p50 / p90 / p99 / min / max):

* **TTFT** - request start to the first chunk that carries generated tokens (a chunk
  with non-empty text, or whose ``usage.completion_tokens`` grew). The role-only first
  chunk of a chat stream does not count. Streaming only.
* **ITL (per token)** - for every chunk after the first token chunk, the gap since the
  previous token chunk divided by the number of tokens in that chunk, counted once per
  token. A server that coalesces k tokens into one chunk therefore contributes k samples
  of gap/k, which keeps ITL comparable with servers that send one token per chunk.
* **Chunk gap** - the raw gaps between token chunks (what a user sees as stutter).
* **TPOT** - per request, (last token time - TTFT) / (output tokens - 1).
* **E2E** - request start to the end of the response (``[DONE]`` for streams).

Tokens per chunk come from ``usage.completion_tokens`` when the server sends it on
every chunk (vLLM's ``stream_options.continuous_usage_stats``); otherwise every
non-empty chunk counts as one token and, when the final ``usage`` reports a different
total, that total is spread evenly over the chunks (``token_source`` tells which).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

PERCENTILES = (50, 90, 99)
MAX_ERROR_MESSAGES = 5


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); ``None`` for no data."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    rank = (len(data) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = math.ceil(rank)
    if lo == hi:
        return float(data[lo])
    return float(data[lo] + (data[hi] - data[lo]) * (rank - lo))


@dataclass
class Stats:
    """Summary of one metric. Values are in the unit of the input (ms for latencies)."""

    count: int = 0
    mean: float | None = None
    min: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Iterable[float], scale: float = 1.0) -> "Stats":
        data = [float(v) * scale for v in values if v is not None]
        if not data:
            return cls()
        return cls(
            count=len(data),
            mean=sum(data) / len(data),
            min=min(data),
            p50=percentile(data, 50),
            p90=percentile(data, 90),
            p99=percentile(data, 99),
            max=max(data),
        )

    def triple(self, digits: int = 1) -> str:
        """``p50 / p90 / p99`` for tables, ``n/a`` without data."""
        if not self.count:
            return "n/a"
        return " / ".join(_fmt(v, digits) for v in (self.p50, self.p90, self.p99))


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


@dataclass
class RequestRecord:
    """What one request produced. Times are seconds; ``start`` is relative to the run start."""

    index: int
    ok: bool
    start: float
    e2e: float | None = None
    ttft: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    # Offsets (seconds since request start) of the chunks that carried tokens, and how
    # many tokens each carried (floats when spread from a final usage total).
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[float] = field(default_factory=list)
    token_source: str = "none"  # usage-per-chunk | usage-final | chunks | usage | none
    error: str | None = None
    http_status: int | None = None
    text: str | None = None  # the generated text, when the caller asked to keep it (a chat's next turn)

    def itl_per_token(self) -> list[float]:
        """Per-token inter-token latencies (see module doc)."""
        out: list[float] = []
        for i in range(1, len(self.chunk_times)):
            gap = self.chunk_times[i] - self.chunk_times[i - 1]
            tokens = self.chunk_tokens[i] if i < len(self.chunk_tokens) else 1
            n = max(1, int(round(tokens)))
            out.extend([gap / n] * n)
        return out

    def chunk_gaps(self) -> list[float]:
        return [self.chunk_times[i] - self.chunk_times[i - 1] for i in range(1, len(self.chunk_times))]

    def tpot(self) -> float | None:
        if self.ttft is None or not self.chunk_times or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.chunk_times[-1] - self.ttft) / (self.output_tokens - 1)


@dataclass
class BenchResult:
    """Aggregate of one benchmark run; ``to_dict`` is the JSON form."""

    label: str
    config: dict[str, Any]
    started_at: str
    duration_s: float
    num_requests: int  # requests issued (not counting warm-up / calibration)
    completed: int
    failed: int
    cancelled: int  # still in flight when --max-duration (+ drain) ran out
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output) tokens / s
    ttft_ms: Stats
    itl_ms: Stats
    chunk_gap_ms: Stats
    tpot_ms: Stats
    e2e_ms: Stats
    input_len: Stats
    output_len: Stats
    tokens_per_chunk: float | None  # streamed tokens / token-carrying chunks (1.0: no coalescing)
    output_len_mismatches: int  # successful requests whose token count != --output-len
    token_source: dict[str, int]
    errors: dict[str, Any]
    requests: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchResult":
        data = dict(data)
        for key in ("ttft_ms", "itl_ms", "chunk_gap_ms", "tpot_ms", "e2e_ms", "input_len", "output_len"):
            data[key] = Stats(**data[key])
        return cls(**data)


def summarize(
    records: Sequence[RequestRecord],
    *,
    label: str,
    config: dict[str, Any],
    started_at: str,
    duration_s: float,
    num_requests: int,
    cancelled: int = 0,
    expected_output_len: int | None = None,
    keep_requests: bool = False,
) -> BenchResult:
    ok = [r for r in records if r.ok]
    bad = [r for r in records if not r.ok]
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    duration = max(duration_s, 1e-9)
    sources: dict[str, int] = {}
    for r in ok:
        sources[r.token_source] = sources.get(r.token_source, 0) + 1
    messages: dict[str, int] = {}
    for r in bad:
        msg = (r.error or "unknown error")[:300]
        messages[msg] = messages.get(msg, 0) + 1
    first = [{"message": m, "count": c} for m, c in list(messages.items())[:MAX_ERROR_MESSAGES]]
    chunks = sum(len(r.chunk_times) for r in ok)
    streamed = sum(sum(r.chunk_tokens) for r in ok)
    mismatches = 0
    if expected_output_len is not None:
        mismatches = sum(1 for r in ok if r.output_tokens != expected_output_len)
    return BenchResult(
        label=label,
        config=config,
        started_at=started_at,
        duration_s=duration_s,
        num_requests=num_requests,
        completed=len(ok),
        failed=len(bad),
        cancelled=cancelled,
        total_input_tokens=in_tokens,
        total_output_tokens=out_tokens,
        request_throughput=len(ok) / duration,
        output_throughput=out_tokens / duration,
        total_token_throughput=(in_tokens + out_tokens) / duration,
        ttft_ms=Stats.of((r.ttft for r in ok), 1000.0),
        itl_ms=Stats.of((x for r in ok for x in r.itl_per_token()), 1000.0),
        chunk_gap_ms=Stats.of((x for r in ok for x in r.chunk_gaps()), 1000.0),
        tpot_ms=Stats.of((r.tpot() for r in ok), 1000.0),
        e2e_ms=Stats.of((r.e2e for r in ok), 1000.0),
        input_len=Stats.of(r.prompt_tokens for r in ok),
        output_len=Stats.of(r.output_tokens for r in ok),
        tokens_per_chunk=streamed / chunks if chunks else None,
        output_len_mismatches=mismatches,
        token_source=sources,
        errors={"count": len(bad), "distinct": len(messages), "first": first},
        requests=[asdict(r) for r in records] if keep_requests else None,
    )


# --------------------------------------------------------------------------- rendering

TABLE_HEADER = (
    "| run | endpoint | stream | conc | rate | ok / err | req/s | out tok/s "
    "| TTFT ms p50 / p90 / p99 | ITL ms p50 / p90 / p99 | E2E ms p50 / p90 / p99 |"
)
TABLE_RULE = "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"


def table_row(result: BenchResult) -> str:
    cfg = result.config
    rate = cfg.get("request_rate")
    err = result.failed + result.cancelled
    return (
        f"| {result.label} | {cfg.get('endpoint', '?')} | {'yes' if cfg.get('stream') else 'no'} "
        f"| {cfg.get('concurrency', '?')} | {rate if rate else '-'} "
        f"| {result.completed} / {err} | {result.request_throughput:.2f} "
        f"| {result.output_throughput:.1f} | {result.ttft_ms.triple()} "
        f"| {result.itl_ms.triple(2)} | {result.e2e_ms.triple()} |"
    )


def markdown_table(results: Sequence[BenchResult]) -> str:
    return "\n".join([TABLE_HEADER, TABLE_RULE, *(table_row(r) for r in results)])


def markdown_report(results: Sequence[BenchResult], title: str | None = "rayllm bench") -> str:
    lines: list[str] = []
    if title:
        lines += [f"## {title}", ""]
    lines.append(markdown_table(results))
    notes: list[str] = []
    for r in results:
        if r.errors["count"] or r.cancelled:
            notes.append(f"- **{r.label}**: {r.errors['count']} failed, {r.cancelled} cancelled at the time limit")
            for e in r.errors["first"]:
                notes.append(f"  - {e['count']}x `{e['message']}`")
        if r.output_len_mismatches:
            notes.append(
                f"- **{r.label}**: {r.output_len_mismatches} requests returned a token count "
                f"other than --output-len {r.config.get('output_len')}"
            )
        if r.input_len.count:
            notes.append(
                f"- **{r.label}**: input tokens mean {r.input_len.mean:.0f} "
                f"(min {r.input_len.min:.0f}, max {r.input_len.max:.0f}); output tokens mean "
                f"{(r.output_len.mean or 0):.1f}; duration {r.duration_s:.1f} s; "
                + (f"chunk gap p50 {r.chunk_gap_ms.p50:.2f} ms with {r.tokens_per_chunk:.2f} tokens/chunk; "
                   if r.tokens_per_chunk and r.chunk_gap_ms.count else "")
                + f"token counts from {', '.join(f'{k}: {v}' for k, v in r.token_source.items()) or 'n/a'}"
            )
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- progress


class ProgressLine:
    """A single self-overwriting status line on stderr, redrawn at most ``hz`` times a second."""

    def __init__(self, total: int, label: str = "", enabled: bool = True, stream=None, hz: float = 5.0):
        self.total = max(total, 1)
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = 1.0 / hz
        self._last = 0.0
        self._start = time.perf_counter()
        self._width = 0

    def render(self, done: int, failed: int, inflight: int, out_tokens: int) -> str:
        elapsed = time.perf_counter() - self._start
        frac = min(done / self.total, 1.0)
        bar_len = 24
        filled = int(bar_len * frac)
        bar = "#" * filled + "." * (bar_len - filled)
        tps = out_tokens / elapsed if elapsed > 0 else 0.0
        prefix = f"{self.label} " if self.label else ""
        return (
            f"{prefix}[{bar}] {done}/{self.total} err {failed} in-flight {inflight} "
            f"{elapsed:6.1f}s {tps:8.1f} tok/s"
        )

    def update(self, done: int, failed: int, inflight: int, out_tokens: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < self.min_interval:
            return
        self._last = now
        text = self.render(done, failed, inflight, out_tokens)
        pad = " " * max(0, self._width - len(text))
        self._width = len(text)
        self.stream.write("\r" + text + pad)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()

"""HTTP side of ``rayllm bench``: an SSE parser, token accounting for streamed chunks and
one-request functions for the OpenAI ``/completions`` and ``/chat/completions`` APIs."""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from rayllm_app.bench.report import RequestRecord


class SSEParser:
    """Incremental parser for ``text/event-stream``: feed raw bytes, get event data strings.

    Follows the WHATWG rules that matter here: ``\\n``, ``\\r\\n`` and ``\\r`` end lines,
    a blank line dispatches the event, several ``data:`` lines are joined with ``\\n``,
    one space after the colon is dropped, ``:`` lines are comments and other fields
    (``event``, ``id``, ``retry``) are ignored. Bytes are decoded incrementally, so a
    multi-byte UTF-8 character split across network reads is handled.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes | str) -> list[str]:
        text = chunk if isinstance(chunk, str) else self._decoder.decode(chunk)
        self._buf += text
        events: list[str] = []
        while True:
            idx = _line_end(self._buf)
            if idx is None:
                break
            line, sep_len = self._buf[:idx], 2 if self._buf.startswith("\r\n", idx) else 1
            self._buf = self._buf[idx + sep_len :]
            self._line(line, events)
        return events

    def finish(self) -> list[str]:
        """Flush at end of stream: a last event without its blank line still counts."""
        events: list[str] = []
        tail = self._decoder.decode(b"", final=True)
        rest = self._buf + tail
        self._buf = ""
        for line in rest.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
            if line:
                self._line(line, events)
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _line(self, line: str, events: list[str]) -> None:
        if line == "":
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)


def _line_end(buf: str) -> int | None:
    """Index of the first complete line terminator; a trailing lone ``\\r`` waits for more."""
    for i, ch in enumerate(buf):
        if ch == "\n":
            return i
        if ch == "\r":
            if i + 1 < len(buf):
                return i
            return None  # could be the first half of \r\n
    return None


@dataclass
class ChunkEvent:
    """One parsed stream chunk: arrival offset, whether it carried text, and usage if any."""

    t: float
    has_text: bool
    completion_tokens: int | None = None
    has_choices: bool = True


def chunk_text(obj: dict[str, Any]) -> str:
    """Generated text in a completions or chat chunk (content and reasoning fields)."""
    parts: list[str] = []
    for choice in obj.get("choices") or []:
        if "text" in choice and isinstance(choice["text"], str):
            parts.append(choice["text"])
        delta = choice.get("delta") or {}
        for key in ("content", "reasoning_content", "reasoning"):
            value = delta.get(key)
            if isinstance(value, str):
                parts.append(value)
    return "".join(parts)


def account_tokens(events: list[ChunkEvent], final_completion_tokens: int | None):
    """Turn chunk events into (token chunk times, tokens per chunk, output tokens, source).

    With per-chunk usage (vLLM ``continuous_usage_stats``), a chunk carries as many tokens
    as ``completion_tokens`` grew since the previous chunk; chunks that grew it are token
    chunks even when their text is empty (a token that ends mid UTF-8 character).
    Without it, every chunk with text is a token chunk worth one token, rescaled evenly
    when the final usage reports another total.
    """
    per_chunk = any(e.completion_tokens is not None and e.has_choices for e in events)
    times: list[float] = []
    tokens: list[float] = []
    if per_chunk:
        last = 0
        for e in events:
            if e.completion_tokens is None:
                continue
            grew = e.completion_tokens - last
            if grew > 0:
                times.append(e.t)
                tokens.append(float(grew))
                last = e.completion_tokens
        total = max(last, final_completion_tokens or 0)
        return times, tokens, total, "usage-per-chunk"
    times = [e.t for e in events if e.has_text]
    if final_completion_tokens is not None:
        total = final_completion_tokens
        per = total / len(times) if times else 0.0
        return times, [per] * len(times), total, "usage-final"
    return times, [1.0] * len(times), len(times), "chunks"


class StreamError(Exception):
    pass


def _error_message(obj: Any) -> str:
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(obj)


async def send_request(
    session: aiohttp.ClientSession,
    url: str,
    payload: dict[str, Any],
    *,
    index: int,
    run_start: float,
    stream: bool,
    keep_text: bool = False,
) -> RequestRecord:
    """POST one request and measure it (with ``keep_text``, a stream's text goes in
    ``rec.text``). Never raises except on cancellation."""
    t0 = time.perf_counter()
    rec = RequestRecord(index=index, ok=False, start=t0 - run_start)
    try:
        async with session.post(url, json=payload) as resp:
            rec.http_status = resp.status
            if resp.status != 200:
                body = (await resp.text())[:300]
                try:
                    body = _error_message(json.loads(body))
                except ValueError:
                    pass
                rec.error = f"HTTP {resp.status}: {body}".strip()
                rec.e2e = time.perf_counter() - t0
                return rec
            if stream:
                await _read_stream(resp, rec, t0, keep_text)
            else:
                obj = await resp.json(content_type=None)
                rec.e2e = time.perf_counter() - t0
                if isinstance(obj, dict) and "error" in obj and not obj.get("choices"):
                    raise StreamError(_error_message(obj))
                usage = obj.get("usage") or {}
                rec.prompt_tokens = usage.get("prompt_tokens")
                rec.output_tokens = usage.get("completion_tokens")
                rec.token_source = "usage" if rec.output_tokens is not None else "none"
            rec.ok = True
    except asyncio.CancelledError:
        raise
    except StreamError as exc:
        rec.error = f"stream error: {exc}"
    except asyncio.TimeoutError:
        rec.error = "timeout (--request-timeout)"
    except Exception as exc:  # noqa: BLE001 - every failure is data for the report
        rec.error = f"{type(exc).__name__}: {exc}"
    if rec.e2e is None:
        rec.e2e = time.perf_counter() - t0
    return rec


async def _read_stream(resp: aiohttp.ClientResponse, rec: RequestRecord, t0: float, keep_text: bool = False) -> None:
    """Read an SSE response. All events that arrive in one network read form one chunk:
    a server (or proxy) that flushes several events at once is coalescing tokens, and
    the per-token ITL then spreads the gap over all of them."""
    parser = SSEParser()
    events: list[ChunkEvent] = []
    final_tokens: int | None = None
    done = False
    texts: list[str] = []

    def handle(batch: list[str], now: float) -> None:
        nonlocal final_tokens, done
        merged: ChunkEvent | None = None
        for data in batch:
            if data.strip() == "[DONE]":
                done = True
                continue
            obj = json.loads(data)
            if "error" in obj and not obj.get("choices"):
                raise StreamError(_error_message(obj))
            usage = obj.get("usage") or None
            ct = usage.get("completion_tokens") if usage else None
            if usage and usage.get("prompt_tokens") is not None:
                rec.prompt_tokens = usage["prompt_tokens"]
            if not obj.get("choices"):  # the final usage-only chunk (or a keep-alive)
                if ct is not None:
                    final_tokens = ct
                continue
            text = chunk_text(obj)
            if keep_text:
                texts.append(text)
            event = ChunkEvent(now - t0, bool(text), ct)
            merged = event if merged is None else merge_events(merged, event)
        if merged is not None:
            events.append(merged)

    async for raw in resp.content.iter_any():
        handle(parser.feed(raw), time.perf_counter())
    now = time.perf_counter()
    handle(parser.finish(), now)
    rec.e2e = now - t0
    if not done:
        raise StreamError("stream closed before data: [DONE]")
    if keep_text:
        rec.text = "".join(texts)
    times, tokens, total, source = account_tokens(events, final_tokens)
    rec.chunk_times, rec.chunk_tokens = times, tokens
    rec.output_tokens, rec.token_source = total, source
    rec.ttft = times[0] if times else None


def merge_events(a: ChunkEvent, b: ChunkEvent) -> ChunkEvent:
    """Two events of the same network read as one chunk (usage counts are cumulative)."""
    cts = [c for c in (a.completion_tokens, b.completion_tokens) if c is not None]
    return ChunkEvent(
        t=b.t,
        has_text=a.has_text or b.has_text,
        completion_tokens=max(cts) if cts else None,
        has_choices=a.has_choices or b.has_choices,
    )

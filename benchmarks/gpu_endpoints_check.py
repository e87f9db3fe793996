"""Endpoint check of an OpenAI-compatible server: every API rayllm-app forwards to vLLM, once.

usage: python benchmarks/gpu_endpoints_check.py --base-url http://127.0.0.1:8000 \
           [--chat-model M] [--embed-model E] [--embed-dim 384] [--api-key K] \
           [--max-tokens 32] [--json-out FILE] [--label NAME] [--skip CHECK,...]

Sends, to the chat model (default: the first id /v1/models lists):
  chat                 non-streamed chat completion
  chat_stream          streamed chat (role chunk, content, finish_reason, usage, [DONE])
  tools_auto           chat with a tool and tool_choice "auto", not streamed
  tools_auto_stream    the same, streamed: tool_calls deltas counted
  tools_required_stream  tool_choice "required", streamed: vLLM constrains the output to a call
  tools_named_stream   tool_choice naming the function, streamed: tool_calls deltas expected
  responses            POST /v1/responses (store) and GET /v1/responses/{id}, then a follow-up
                       with previous_response_id
  messages             POST /v1/messages (Anthropic) and /v1/messages/count_tokens
  tokenize             POST /tokenize and /detokenize (round trip of the ids)
  embeddings_on_chat   /v1/embeddings on the chat model: rayllm-app answers 400 unsupported_endpoint
                       (bare vLLM has no such route for a generative model: 404)
and, with --embed-model, embeddings: /v1/embeddings of two inputs, vector length (--embed-dim)
and L2 norm.

A random-weight model writes noise: with tool_choice "auto" it will not emit a finished call, so
those checks pass on a well-formed 200 answer and report the tool_calls deltas they saw; "required"
and named choices are constrained by vLLM's structured outputs and do stream tool_calls deltas.
Prints one line per check (status, ok, seconds, excerpt) and a summary; --json-out appends one JSON
line with every result. Exit status 1 if any check failed. Needs only httpx.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import httpx

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]


def excerpt(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_of(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return excerpt(response.text)
    error = body.get("error", body) if isinstance(body, dict) else body
    return excerpt(error)


class Checker:
    def __init__(self, client: httpx.Client, base: str, max_tokens: int) -> None:
        self.client = client
        self.base = base
        self.max_tokens = max_tokens
        self.results: list[dict[str, Any]] = []

    def record(self, name: str, status: int | None, ok: bool, seconds: float, detail: str, **extra: Any) -> None:
        result = {"check": name, "status": status, "ok": ok, "seconds": round(seconds, 3), "detail": detail, **extra}
        self.results.append(result)
        print(f"{'PASS' if ok else 'FAIL'} {name:<22} {status!s:>4} {seconds:7.2f}s  {detail}", flush=True)

    def run(self, name: str, fn: Any, *args: Any) -> None:
        t0 = time.perf_counter()
        try:
            fn(name, t0, *args)
        except Exception as error:  # noqa: BLE001 - one broken check must not hide the others
            self.record(name, None, False, time.perf_counter() - t0, f"{type(error).__name__}: {excerpt(str(error))}")

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return self.client.post(self.base + path, json=body)

    def sse(self, path: str, body: dict[str, Any]) -> tuple[int, list[dict[str, Any]], bool, str]:
        """(status, parsed events, [DONE] seen, error text)."""
        events, done = [], False
        with self.client.stream("POST", self.base + path, json=body) as response:
            if response.status_code != 200:
                response.read()
                return response.status_code, [], False, error_of(response)
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                events.append(json.loads(line[6:]))
        return 200, events, done, ""

    # ---- chat
    def chat(self, name: str, t0: float, model: str) -> None:
        r = self.post("/v1/chat/completions", {"model": model, "messages": QUESTION, "max_tokens": self.max_tokens,
                                               "temperature": 0})
        if r.status_code != 200:
            return self.record(name, r.status_code, False, time.perf_counter() - t0, error_of(r))
        data = r.json()
        choice = data["choices"][0]
        ok = data.get("object") == "chat.completion" and choice.get("finish_reason") is not None
        self.record(name, 200, ok, time.perf_counter() - t0,
                    f"finish={choice.get('finish_reason')} usage={data.get('usage', {}).get('completion_tokens')} "
                    f"text={excerpt(choice['message'].get('content') or '', 60)!r}")

    def stream_chat(self, name: str, t0: float, body: dict[str, Any], need_tool_calls: bool) -> None:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        status, events, done, err = self.sse("/v1/chat/completions", body)
        if status != 200:
            return self.record(name, status, False, time.perf_counter() - t0, err)
        errors = [e["error"] for e in events if "error" in e]
        chunks = [e for e in events if e.get("choices")]
        deltas = [c["choices"][0].get("delta") or {} for c in chunks]
        roles = [d["role"] for d in deltas if d.get("role")]
        text = "".join(d.get("content") or "" for d in deltas)
        calls = [call for d in deltas for call in d.get("tool_calls") or []]
        names = sorted({(c.get("function") or {}).get("name") for c in calls} - {None})
        args = "".join((c.get("function") or {}).get("arguments") or "" for c in calls)
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0].get("finish_reason")]
        usage = [e["usage"] for e in events if e.get("usage")]
        ok = done and not errors and bool(finish) and bool(usage) and roles[:1] == ["assistant"]
        if need_tool_calls:
            ok = ok and bool(names)
        detail = (f"chunks={len(chunks)} [DONE]={done} finish={finish[-1:] or None} "
                  f"usage={usage[-1].get('completion_tokens') if usage else None} tool_call_deltas={len(calls)}")
        if names:
            detail += f" names={names} args={excerpt(args, 50)!r}"
        elif text:
            detail += f" text={excerpt(text, 50)!r}"
        if errors:
            detail += f" error_event={excerpt(errors[0])}"
        self.record(name, 200, ok, time.perf_counter() - t0, detail, tool_call_deltas=len(calls), tool_names=names)

    def chat_stream(self, name: str, t0: float, model: str) -> None:
        self.stream_chat(name, t0, {"model": model, "messages": QUESTION, "max_tokens": self.max_tokens,
                                    "temperature": 0}, need_tool_calls=False)

    def tools(self, name: str, t0: float, model: str, choice: Any, stream: bool) -> None:
        body = {"model": model, "messages": QUESTION, "tools": [WEATHER_TOOL], "tool_choice": choice,
                "max_tokens": self.max_tokens * 4, "temperature": 0}
        if stream:
            return self.stream_chat(name, t0, body, need_tool_calls=choice != "auto")
        r = self.post("/v1/chat/completions", body)
        if r.status_code != 200:
            return self.record(name, r.status_code, False, time.perf_counter() - t0, error_of(r))
        choice0 = r.json()["choices"][0]
        calls = choice0["message"].get("tool_calls") or []
        self.record(name, 200, choice0.get("finish_reason") is not None, time.perf_counter() - t0,
                    f"finish={choice0.get('finish_reason')} tool_calls={len(calls)} "
                    f"content={excerpt(choice0['message'].get('content') or '', 50)!r}")

    # ---- responses
    def responses(self, name: str, t0: float, model: str) -> None:
        r = self.post("/v1/responses", {"model": model, "input": "Name a French city.",
                                        "max_output_tokens": self.max_tokens, "temperature": 0, "store": True})
        if r.status_code != 200:
            return self.record(name, r.status_code, False, time.perf_counter() - t0, "create: " + error_of(r))
        created = r.json()
        rid = created.get("id")
        g = self.client.get(f"{self.base}/v1/responses/{rid}")
        got = g.json() if g.status_code == 200 else {}
        f = self.post("/v1/responses", {"model": model, "input": "And another?", "previous_response_id": rid,
                                        "max_output_tokens": self.max_tokens, "temperature": 0})
        ok = (created.get("object") == "response" and g.status_code == 200 and got.get("id") == rid
              and f.status_code == 200)
        text = "".join(part.get("text", "") for item in created.get("output") or [] if item.get("type") == "message"
                       for part in item.get("content") or [])
        self.record(name, r.status_code, ok, time.perf_counter() - t0,
                    f"id={rid} status={created.get('status')} GET={g.status_code} same_id={got.get('id') == rid} "
                    f"follow-up={f.status_code}{'' if f.status_code == 200 else ' ' + error_of(f)} "
                    f"text={excerpt(text, 40)!r}",
                    retrieve_status=g.status_code, follow_up_status=f.status_code)

    # ---- Anthropic messages
    def messages(self, name: str, t0: float, model: str) -> None:
        body = {"model": model, "max_tokens": self.max_tokens, "messages": [{"role": "user", "content": "Hello"}]}
        r = self.post("/v1/messages", body)
        if r.status_code != 200:
            return self.record(name, r.status_code, False, time.perf_counter() - t0, error_of(r))
        data = r.json()
        c = self.post("/v1/messages/count_tokens", {k: v for k, v in body.items() if k != "max_tokens"})
        count = c.json().get("input_tokens") if c.status_code == 200 else None
        text = "".join(block.get("text", "") for block in data.get("content") or [])
        self.record(name, 200, data.get("type") == "message" and c.status_code == 200, time.perf_counter() - t0,
                    f"stop_reason={data.get('stop_reason')} usage={data.get('usage')} count_tokens={c.status_code}:"
                    f"{count} text={excerpt(text, 40)!r}")

    # ---- tokenizer
    def tokenize(self, name: str, t0: float, model: str) -> None:
        prompt = "The capital of France is Paris."
        r = self.post("/tokenize", {"model": model, "prompt": prompt})
        if r.status_code != 200:
            return self.record(name, r.status_code, False, time.perf_counter() - t0, error_of(r))
        data = r.json()
        d = self.post("/detokenize", {"model": model, "tokens": data["tokens"]})
        back = d.json().get("prompt") if d.status_code == 200 else None
        round_trip = prompt in (back or "")  # special tokens (BOS) may be added around it
        ok = data.get("count") == len(data["tokens"]) > 0 and d.status_code == 200 and round_trip
        self.record(name, 200, ok, time.perf_counter() - t0,
                    f"count={data.get('count')} max_model_len={data.get('max_model_len')} tokens={data['tokens'][:6]} "
                    f"detokenize={d.status_code} round_trip={round_trip}")

    # ---- embeddings
    def embeddings(self, name: str, t0: float, model: str, dim: int | None) -> None:
        r = self.post("/v1/embeddings", {"model": model, "input": ["A man is eating food.", "A man is eating bread."]})
        if r.status_code != 200:
            return self.record(name, r.status_code, False, time.perf_counter() - t0, error_of(r))
        data = r.json()
        vectors = [item["embedding"] for item in data["data"]]
        dims = sorted({len(v) for v in vectors})
        norms = [round(math.sqrt(sum(x * x for x in v)), 4) for v in vectors]
        ok = len(vectors) == 2 and (dim is None or dims == [dim])
        self.record(name, 200, ok, time.perf_counter() - t0,
                    f"vectors={len(vectors)} dims={dims} norms={norms} usage={data.get('usage')} "
                    f"head={[round(x, 4) for x in vectors[0][:3]]}", dims=dims)

    def embeddings_on_chat(self, name: str, t0: float, model: str) -> None:
        r = self.post("/v1/embeddings", {"model": model, "input": "hello"})
        code = None
        try:
            code = (r.json().get("error") or {}).get("code")
        except (ValueError, AttributeError):
            pass
        # rayllm-app: 400 unsupported_endpoint; bare vLLM serving a generative model: 404 (no route).
        self.record(name, r.status_code, r.status_code in (400, 404), time.perf_counter() - t0,
                    f"code={code} {error_of(r)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (with or without /v1)")
    ap.add_argument("--chat-model", help="generative model id (default: the first /v1/models lists)")
    ap.add_argument("--embed-model", help="embedding model id (no embedding check without it)")
    ap.add_argument("--embed-dim", type=int, help="expected embedding length")
    ap.add_argument("--api-key", help="sent as Authorization: Bearer")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--skip", default="", help="comma list of checks to leave out")
    ap.add_argument("--label", default="", help="stored with --json-out")
    ap.add_argument("--json-out", help="append one JSON line with all results")
    a = ap.parse_args()
    base = a.base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    with httpx.Client(timeout=a.timeout, headers=headers) as client:
        listed = client.get(base + "/v1/models")
        ids = [m["id"] for m in listed.json().get("data", [])] if listed.status_code == 200 else []
        chat_model = a.chat_model or (ids[0] if ids else None)
        if not chat_model:
            print(f"no model given and /v1/models answered {listed.status_code}", file=sys.stderr)
            return 2
        print(f"{base}: models {ids}; chat model {chat_model}; embedding model {a.embed_model}", flush=True)
        c = Checker(client, base, a.max_tokens)
        named = {"type": "function", "function": {"name": "get_weather"}}
        plan = [("chat", c.chat, chat_model), ("chat_stream", c.chat_stream, chat_model),
                ("tools_auto", c.tools, chat_model, "auto", False),
                ("tools_auto_stream", c.tools, chat_model, "auto", True),
                ("tools_required_stream", c.tools, chat_model, "required", True),
                ("tools_named_stream", c.tools, chat_model, named, True),
                ("responses", c.responses, chat_model), ("messages", c.messages, chat_model),
                ("tokenize", c.tokenize, chat_model), ("embeddings_on_chat", c.embeddings_on_chat, chat_model)]
        if a.embed_model:
            plan.append(("embeddings", c.embeddings, a.embed_model, a.embed_dim))
        for name, fn, *args in plan:
            if name not in skip:
                c.run(name, fn, *args)
    failed = [r["check"] for r in c.results if not r["ok"]]
    print(f"summary: {len(c.results) - len(failed)}/{len(c.results)} passed" + (f"; failed: {failed}" if failed else ""))
    if a.json_out:
        with open(a.json_out, "a") as f:
            f.write(json.dumps({"label": a.label, "base_url": base, "models": ids, "chat_model": chat_model,
                                "embed_model": a.embed_model, "time": time.time(), "results": c.results}) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Differential test: rayllm-app answers exactly like bare vLLM's OpenAI server.

A fixed corpus of requests (data: method, path, JSON body, stream flag, the status bare vLLM
gives) goes, one at a time, to bare ``python -m vllm.entrypoints.openai.api_server``
(conftest's ``bare_vllm``) and to rayllm-app (``served_app``), both serving the tiny random
Llama as ``tiny-tools`` with the same engine and frontend options (Hermes tool template,
``--enable-auto-tool-choice --tool-call-parser hermes``). Sampling is greedy or seeded, so the
answers are deterministic and must agree:

* the status code and the content type;
* JSON bodies, after normalising only ids, ``created``-like timestamps,
  ``system_fingerprint`` and the model card's ``root`` (NORMALISED_KEYS, ID_PATTERN);
* SSE streams: the concatenated content / reasoning / text / tool-call deltas per choice,
  the finish and stop reasons, logprobs, usage (token counts), the sequence of event types of
  /v1/responses and /v1/messages streams, and their final objects;
* errors: the same status, the same ``error.type`` and the same message (all come from vLLM).

The deliberate differences of rayllm-app are named in DELIBERATE (request name -> reason);
for those the test checks rayllm-app's own answer instead. Every mismatch is collected and
reported at once.

``test_corpus_is_deterministic_on_bare_vllm`` validates the corpus against bare vLLM alone:
every request gets the expected status, and a second run gives the same answers.

Run the corpus by hand against any server:
``python -m tests.e2e.test_vllm_parity_e2e http://127.0.0.1:8000 [API_KEY]``.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx
import pytest

pytestmark = pytest.mark.e2e

MODEL = "tiny-tools"
MSG = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS = [WEATHER_TOOL]
TOOL_MSG = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED_CHOICE = {"type": "function", "function": {"name": "get_weather"}}
# A finished tool round: the assistant called get_weather, the tool answered.
TOOL_RESULT_TURN = TOOL_MSG + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_weather_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_weather_1", "content": "{\"temperature_c\": 21, \"sky\": \"clear\"}"},
]
JSON_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                 "ok": {"type": "boolean"}},
               "required": ["city", "ok"], "additionalProperties": False}
LONG_TEXT = "alpha beta gamma delta " * 200  # far more than the 512-token context
ANTHROPIC_TOOL = {"name": "get_weather", "description": "Weather in a city",
                  "input_schema": WEATHER_TOOL["function"]["parameters"]}


@dataclass
class Req:
    name: str
    method: str
    path: str  # may name an earlier request's id: "/v1/responses/{responses_store_true}"
    body: Any = None  # a JSON value, or str for raw (invalid) bytes
    stream: bool = False
    expect: int = 200  # the status bare vLLM answers (checked by the bare-only test)


def chat(name: str, stream: bool = False, expect: int = 200, **body) -> Req:
    body = {"model": MODEL, "messages": MSG, "max_tokens": 16, "temperature": 0, **body}
    if stream:
        body["stream"] = True
        body.setdefault("stream_options", {"include_usage": True})
    return Req(name, "POST", "/v1/chat/completions", body, stream, expect)


def completion(name: str, stream: bool = False, expect: int = 200, **body) -> Req:
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, **body}
    if stream:
        body["stream"] = True
        body.setdefault("stream_options", {"include_usage": True})
    return Req(name, "POST", "/v1/completions", body, stream, expect)


def messages(name: str, stream: bool = False, expect: int = 200, **body) -> Req:
    body = {"model": MODEL, "max_tokens": 16, "temperature": 0, "messages": MSG, **body}
    if stream:
        body["stream"] = True
    return Req(name, "POST", "/v1/messages", body, stream, expect)


def responses(name: str, stream: bool = False, expect: int = 200, **body) -> Req:
    body = {"model": MODEL, "input": "What is the capital of France?", "max_output_tokens": 16,
            "temperature": 0, **body}
    if stream:
        body["stream"] = True
    return Req(name, "POST", "/v1/responses", body, stream, expect)


def _without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


CORPUS: list[Req] = [
    # --- chat completions
    chat("chat_basic"),
    chat("chat_stream", stream=True),
    chat("chat_multi_turn_system", messages=[
        {"role": "system", "content": "Answer in one word."}, *MSG,
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Japan?"}]),
    chat("chat_custom_role", messages=[{"role": "wizard", "content": "What is the capital of France?"}]),
    chat("chat_content_parts", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is the capital"}, {"type": "text", "text": " of France?"}]}]),
    chat("chat_stop", stop=["e", "o"]),
    chat("chat_stop_stream", stream=True, stop=["e", "o"]),
    chat("chat_n2_seed", n=2, temperature=1.0, seed=1234),
    chat("chat_n2_seed_stream", stream=True, n=2, temperature=1.0, seed=1234),
    chat("chat_seed_top_p_penalties", temperature=0.8, top_p=0.9, seed=7, presence_penalty=0.5,
         frequency_penalty=0.3, repetition_penalty=1.1, top_k=20),
    chat("chat_logprobs", logprobs=True, top_logprobs=3, max_tokens=6),
    chat("chat_logprobs_stream", stream=True, logprobs=True, top_logprobs=2, max_tokens=6),
    chat("chat_max_completion_tokens", max_completion_tokens=5, max_tokens=None),
    chat("chat_min_tokens_ignore_eos", min_tokens=8, max_tokens=8, ignore_eos=True),
    chat("chat_logit_bias", logit_bias={"100": 100}, max_tokens=4),
    chat("chat_json_schema", max_tokens=40, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": JSON_SCHEMA, "strict": True}}),
    chat("chat_json_schema_stream", stream=True, max_tokens=40, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": JSON_SCHEMA}}),
    chat("chat_json_object", max_tokens=12, response_format={"type": "json_object"}),
    chat("chat_structured_choice", structured_outputs={"choice": ["yes", "no", "maybe"]}),
    chat("chat_structured_regex_stream", stream=True, structured_outputs={"regex": "[0-9]{3}-[a-z]{2}"}),
    chat("chat_echo_continue", messages=[*MSG, {"role": "assistant", "content": "The capital is"}],
         add_generation_prompt=False, continue_final_message=True, echo=True, max_tokens=6),
    # tools
    chat("chat_tools_named", messages=TOOL_MSG, tools=TOOLS, tool_choice=NAMED_CHOICE, max_tokens=40),
    chat("chat_tools_named_stream", stream=True, messages=TOOL_MSG, tools=TOOLS, tool_choice=NAMED_CHOICE,
         max_tokens=40),
    chat("chat_tools_required", messages=TOOL_MSG, tools=TOOLS, tool_choice="required", max_tokens=40),
    chat("chat_tools_required_stream", stream=True, messages=TOOL_MSG, tools=TOOLS, tool_choice="required",
         max_tokens=40),
    chat("chat_tools_auto", messages=TOOL_MSG, tools=TOOLS, tool_choice="auto", max_tokens=24),
    chat("chat_tools_auto_stream", stream=True, messages=TOOL_MSG, tools=TOOLS, max_tokens=24),
    chat("chat_tools_none", messages=TOOL_MSG, tools=TOOLS, tool_choice="none", max_tokens=12),
    chat("chat_tool_result_turn", messages=TOOL_RESULT_TURN, tools=TOOLS, max_tokens=16),
    chat("chat_tool_result_turn_stream", stream=True, messages=TOOL_RESULT_TURN, tools=TOOLS, max_tokens=16),
    chat("chat_parallel_tool_calls_false", messages=TOOL_MSG, tools=[WEATHER_TOOL, TIME_TOOL],
         tool_choice="required", parallel_tool_calls=False, max_tokens=40),
    chat("chat_parallel_tool_calls_stream", stream=True, messages=TOOL_MSG, tools=[WEATHER_TOOL, TIME_TOOL],
         tool_choice="required", parallel_tool_calls=True, max_tokens=40),
    chat("chat_image_url_text_model", expect=400, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]),
    # --- completions
    completion("completion_basic"),
    completion("completion_stream", stream=True),
    completion("completion_stop", stop=[" the", "e"]),
    completion("completion_n2_seed", n=2, temperature=1.0, seed=99),
    completion("completion_n2_seed_stream", stream=True, n=2, temperature=1.0, seed=99),
    completion("completion_logprobs", logprobs=3, max_tokens=6),
    completion("completion_logprobs_stream", stream=True, logprobs=2, max_tokens=6),
    completion("completion_echo", echo=True, max_tokens=4),
    completion("completion_prompt_list", prompt=["The capital of France is", "One two three"], max_tokens=6),
    completion("completion_token_ids", prompt=[1, 30, 31, 32, 33], max_tokens=6),
    completion("completion_json_schema", max_tokens=40, structured_outputs={"json": JSON_SCHEMA}),
    completion("completion_best_effort_penalties", temperature=0.7, seed=5, min_p=0.05,
               frequency_penalty=0.5, max_tokens=10),
    # --- tokenizer endpoints
    Req("tokenize_prompt", "POST", "/tokenize", {"model": MODEL, "prompt": "The capital of France is Paris."}),
    Req("tokenize_chat_tools", "POST", "/tokenize",
        {"model": MODEL, "messages": TOOL_RESULT_TURN, "tools": TOOLS, "add_generation_prompt": True}),
    Req("tokenize_return_strings", "POST", "/tokenize",
        {"model": MODEL, "prompt": "hello world", "return_token_strs": True}),
    Req("detokenize", "POST", "/detokenize", {"model": MODEL, "tokens": [30, 31, 32, 33, 34, 35]}),
    Req("detokenize_out_of_vocab", "POST", "/detokenize", {"model": MODEL, "tokens": [999999]}),
    # --- responses
    responses("responses_store_false", store=False),
    responses("responses_stream", stream=True, store=False),
    responses("responses_instructions_messages", store=False, instructions="Answer briefly.",
              input=[{"role": "user", "content": "What is the capital of Japan?"}]),
    responses("responses_tools_required", store=False, input="What is the weather in Paris?",
              tools=[{"type": "function", **WEATHER_TOOL["function"]}], tool_choice="required",
              max_output_tokens=40),
    responses("responses_store_true", store=True),
    Req("responses_get", "GET", "/v1/responses/{responses_store_true}"),
    Req("responses_cancel_finished", "POST", "/v1/responses/{responses_store_true}/cancel", expect=400),
    Req("responses_get_unknown", "GET", "/v1/responses/resp_0000000000000000", expect=404),
    # --- Anthropic messages
    messages("messages_basic"),
    messages("messages_stream", stream=True),
    messages("messages_system_stop", system="Answer in one word.", stop_sequences=["e"]),
    messages("messages_tools", messages=TOOL_MSG, tools=[ANTHROPIC_TOOL],
             tool_choice={"type": "tool", "name": "get_weather"}, max_tokens=40),
    messages("messages_tools_stream", stream=True, messages=TOOL_MSG, tools=[ANTHROPIC_TOOL],
             tool_choice={"type": "any"}, max_tokens=40),
    Req("messages_count_tokens", "POST", "/v1/messages/count_tokens", {"model": MODEL, "messages": MSG}),
    Req("messages_count_tokens_tools", "POST", "/v1/messages/count_tokens",
        {"model": MODEL, "messages": TOOL_MSG, "tools": [ANTHROPIC_TOOL], "system": "Be brief."}),
    # --- bad requests (every one answered by vLLM itself)
    chat("bad_chat_messages_not_list", expect=400, messages="What is the capital of France?"),
    Req("bad_chat_missing_messages", "POST", "/v1/chat/completions",
        {"model": MODEL, "max_tokens": 8}, expect=400),
    chat("bad_chat_negative_max_tokens", expect=400, max_tokens=-1),
    chat("bad_chat_temperature_string", expect=400, temperature="hot"),
    chat("bad_chat_message_without_role", expect=400, messages=[{"content": "hi"}]),
    chat("bad_chat_stream_options_without_stream", expect=400, stream_options={"include_usage": True}),
    chat("bad_chat_prompt_too_long", expect=400, messages=[{"role": "user", "content": LONG_TEXT}]),
    chat("bad_chat_max_tokens_over_context", expect=400, max_tokens=100000),
    chat("bad_chat_top_logprobs_too_many", expect=400, logprobs=True, top_logprobs=50),
    chat("bad_chat_n_zero", expect=400, n=0),
    chat("bad_chat_unknown_response_format", expect=400, response_format={"type": "xml"}),
    chat("bad_chat_tool_choice_unknown_tool", expect=400, messages=TOOL_MSG, tools=TOOLS,
         tool_choice={"type": "function", "function": {"name": "no_such_tool"}}),
    chat("bad_chat_tool_choice_without_tools", expect=400, tool_choice="required"),
    chat("bad_chat_tool_choice_bad_value", expect=400, messages=TOOL_MSG, tools=TOOLS, tool_choice="always"),
    chat("bad_chat_stream_error_prompt_too_long", stream=True, expect=400,
         messages=[{"role": "user", "content": LONG_TEXT}]),
    completion("bad_completion_negative_max_tokens", expect=400, max_tokens=-5),
    completion("bad_completion_prompt_too_long", expect=400, prompt=LONG_TEXT),
    completion("bad_completion_logprobs_too_many", expect=400, logprobs=50),
    completion("bad_completion_token_id_out_of_vocab", expect=400, prompt=[1, 999999]),
    Req("bad_completion_missing_prompt", "POST", "/v1/completions", {"model": MODEL, "max_tokens": 4}, expect=400),
    completion("bad_completion_n3_greedy", expect=400, n=3),
    Req("bad_tokenize_no_input", "POST", "/tokenize", {"model": MODEL}, expect=400),
    Req("bad_detokenize_not_ints", "POST", "/detokenize", {"model": MODEL, "tokens": ["a", "b"]}, expect=400),
    messages("bad_messages_missing_max_tokens", expect=400, max_tokens=None),
    messages("bad_messages_unknown_role", expect=400, messages=[{"role": "wizard", "content": "hi"}]),
    responses("bad_responses_input_number", expect=400, input=42),
    chat("bad_chat_json_schema_not_a_schema", expect=400, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}),
    # --- deliberate differences (see DELIBERATE)
    Req("diff_chat_missing_model", "POST", "/v1/chat/completions",
        {"messages": MSG, "max_tokens": 4, "temperature": 0}),
    chat("diff_chat_unknown_model", expect=404, model="no-such-model"),
    Req("diff_embeddings_on_chat_model", "POST", "/v1/embeddings", {"model": MODEL, "input": ["hello"]},
        expect=404),
    Req("diff_score_on_chat_model", "POST", "/v1/score",
        {"model": MODEL, "text_1": "hello", "text_2": "world"}, expect=404),
    Req("diff_rerank_on_chat_model", "POST", "/v1/rerank",
        {"model": MODEL, "query": "hello", "documents": ["world"]}, expect=404),
    Req("diff_invalid_json", "POST", "/v1/chat/completions", "{\"model\": \"tiny-tools\", \"messages\": [",
        expect=400),
]
# Fields set to None above are removed (e.g. max_tokens=None: leave the field out).
for _req in CORPUS:
    if isinstance(_req.body, dict):
        _req.body = {k: v for k, v in _req.body.items() if v is not None}


def _error_of(answer: "Answer") -> dict:
    body = answer.body if isinstance(answer.body, dict) else {}
    error = body.get("error")
    return error if isinstance(error, dict) else {}


def _check_missing_model(ours: "Answer", bare: "Answer") -> list[str]:
    # bare vLLM serves its only model when `model` is absent; the router cannot guess.
    problems = []
    if ours.status != 400:
        problems.append(f"status {ours.status}, wanted 400")
    if "model" not in str(_error_of(ours).get("message", "")).lower():
        problems.append(f"error message does not name the missing `model`: {ours.body}")
    return problems


def _check_unknown_model(ours: "Answer", bare: "Answer") -> list[str]:
    problems = []
    if ours.status != 404:
        problems.append(f"status {ours.status}, wanted 404")
    if _error_of(ours).get("code") != "model_not_found":
        problems.append(f"error code is not model_not_found: {ours.body}")
    if "no-such-model" not in str(_error_of(ours).get("message", "")):
        problems.append(f"error message does not name the model: {ours.body}")
    return problems


def _check_endpoint_not_served(ours: "Answer", bare: "Answer") -> list[str]:
    problems = []
    message = str(_error_of(ours).get("message", ""))
    if ours.status != 400:
        problems.append(f"status {ours.status}, wanted 400")
    if MODEL not in message or "/v1/chat/completions" not in message:
        problems.append(f"error message should name {MODEL} and the endpoints it serves: {ours.body}")
    return problems


def _check_invalid_json(ours: "Answer", bare: "Answer") -> list[str]:
    # The router must read `model` from the body before vLLM sees it: its own 400.
    return [] if ours.status == 400 and _error_of(ours) else [f"wanted a 400 error envelope, got {ours.status} "
                                                               f"{ours.body}"]


# Deliberate differences of rayllm-app from bare vLLM: request name -> (reason, check of our answer).
DELIBERATE: dict[str, tuple[str, Callable[["Answer", "Answer"], list[str]]]] = {
    "diff_chat_missing_model": (
        "many models share one endpoint: the router requires `model` in the body (400); bare vLLM "
        "serves its only model", _check_missing_model),
    "diff_chat_unknown_model": (
        "an unknown model is the router's 404 with code model_not_found (bare vLLM: 404 NotFoundError)",
        _check_unknown_model),
    "diff_embeddings_on_chat_model": (
        "an endpoint the model does not serve is the router's 400 naming the model and the endpoints it "
        "serves (bare vLLM: 404 for an unregistered route)", _check_endpoint_not_served),
    "diff_score_on_chat_model": ("as diff_embeddings_on_chat_model, for /v1/score", _check_endpoint_not_served),
    "diff_rerank_on_chat_model": ("as diff_embeddings_on_chat_model, for /v1/rerank", _check_endpoint_not_served),
    "diff_invalid_json": (
        "the router parses the body to find `model`: a body that is not JSON is its own 400",
        _check_invalid_json),
}
# Differences in every answer, normalised before comparing: ids (the body's "id" fields and
# id-shaped strings), creation/completion timestamps, system_fingerprint, the model card root.
NORMALISED_KEYS = {"id", "created", "created_at", "completed_at", "system_fingerprint", "root"}
ID_PATTERN = re.compile(
    r"\b(?:chatcmpl-tool|chatcmpl|cmpl|resp|msg|rs|fc|ft|call|toolu)[-_][0-9A-Za-z]{8,}(?:-\d+)?\b")


@dataclass
class Answer:
    status: int
    content_type: str
    body: Any  # parsed JSON, a stream summary (dict), or the raw text
    raw: str = field(default="", repr=False)


def normalise(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<norm>" if k in NORMALISED_KEYS and v is not None else normalise(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if isinstance(value, str):
        return ID_PATTERN.sub("<id>", value)
    return value


def _sse_events(text: str) -> list[tuple[str | None, Any]]:
    """(event name, parsed data) for each SSE event; data that is not JSON stays a string."""
    events = []
    for block in re.split(r"\r?\n\r?\n", text):
        name, data_lines = None, []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data_lines.append(line[5:].lstrip())
        if not data_lines:
            continue
        data = "\n".join(data_lines)
        try:
            events.append((name, json.loads(data)))
        except ValueError:
            events.append((name, data))
    return events


def _logprob_tokens(logprobs: Any) -> list:
    """The sampled tokens and their alternatives of a chat or completion logprobs object."""
    if not isinstance(logprobs, dict):
        return []
    if "content" in logprobs:  # chat
        return [[e.get("token"), e.get("logprob"), [(t.get("token"), t.get("logprob"))
                                                    for t in e.get("top_logprobs") or []]]
                for e in logprobs.get("content") or []]
    return [list(x) for x in zip(logprobs.get("tokens") or [], logprobs.get("token_logprobs") or [],
                                 [sorted((d or {}).items()) for d in logprobs.get("top_logprobs") or []])]


def summarise_stream(path: str, text: str) -> dict:
    """What a stream says, independent of how it is cut into chunks."""
    events = _sse_events(text)
    summary: dict[str, Any] = {"done": any(data == "[DONE]" for _, data in events), "errors": [],
                               "usage": None}
    choices: dict[int, dict] = {}
    types: list[str] = []
    text_parts: dict[str, str] = {}
    finals: list[Any] = []
    for name, data in events:
        if not isinstance(data, dict):
            continue
        if "error" in data and data.get("type") != "error":
            summary["errors"].append(normalise(data["error"]))
        if data.get("usage"):
            summary["usage"] = normalise(data["usage"])
        if path.startswith("/v1/chat/completions") or path.startswith("/v1/completions"):
            for choice in data.get("choices") or []:
                c = choices.setdefault(choice.get("index", 0), {
                    "role": None, "content": "", "reasoning": "", "text": "", "tool_calls": {},
                    "finish_reason": None, "stop_reason": None, "logprobs": []})
                delta = choice.get("delta") or {}
                c["role"] = c["role"] or delta.get("role")
                c["content"] += delta.get("content") or ""
                c["reasoning"] += delta.get("reasoning") or delta.get("reasoning_content") or ""
                c["text"] += choice.get("text") or ""
                for call in delta.get("tool_calls") or []:
                    tc = c["tool_calls"].setdefault(call.get("index", 0), {"type": None, "name": "",
                                                                          "arguments": "", "has_id": False})
                    tc["type"] = tc["type"] or call.get("type")
                    tc["has_id"] = tc["has_id"] or bool(call.get("id"))
                    fn = call.get("function") or {}
                    tc["name"] += fn.get("name") or ""
                    tc["arguments"] += fn.get("arguments") or ""
                if choice.get("finish_reason") is not None:
                    c["finish_reason"] = choice["finish_reason"]
                if choice.get("stop_reason") is not None:
                    c["stop_reason"] = choice["stop_reason"]
                c["logprobs"] += _logprob_tokens(choice.get("logprobs"))
        else:  # /v1/responses and /v1/messages: typed events
            kind = data.get("type") or name or "?"
            if not types or types[-1] != kind:
                types.append(kind)  # runs of one event type (deltas) count once
            delta = data.get("delta")
            if isinstance(delta, str):
                text_parts[kind] = text_parts.get(kind, "") + delta
            elif isinstance(delta, dict):
                for key in ("text", "partial_json", "thinking"):
                    if key in delta:
                        text_parts[f"{kind}.{key}"] = text_parts.get(f"{kind}.{key}", "") + delta[key]
                if "stop_reason" in delta:
                    finals.append({"stop_reason": delta.get("stop_reason"),
                                   "stop_sequence": delta.get("stop_sequence")})
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                finals.append(normalise(data.get("response")))
            if kind == "message_start":
                finals.append(normalise(data.get("message")))
            if kind == "content_block_start":
                finals.append(normalise(data.get("content_block")))
    summary["choices"] = {str(k): {**v, "tool_calls": {str(i): t for i, t in v["tool_calls"].items()}}
                          for k, v in sorted(choices.items())}
    summary["event_types"] = types
    summary["deltas"] = text_parts
    summary["finals"] = finals
    return summary


def send(client: httpx.Client, req: Req, ids: dict[str, str]) -> Answer:
    path = req.path.format(**ids)
    kwargs: dict[str, Any] = {}
    if isinstance(req.body, str):
        kwargs["content"] = req.body.encode()
        kwargs["headers"] = {"Content-Type": "application/json"}
    elif req.body is not None:
        kwargs["json"] = req.body
    response = client.request(req.method, path, **kwargs)
    content_type = response.headers.get("content-type", "").split(";")[0].strip()
    raw = response.text
    if req.stream and response.status_code == 200 and content_type == "text/event-stream":
        return Answer(response.status_code, content_type, summarise_stream(req.path, raw), raw)
    try:
        body = response.json()
    except ValueError:
        body = raw
    if isinstance(body, dict) and req.path == "/v1/responses" and isinstance(body.get("id"), str):
        ids[req.name] = body["id"]
    return Answer(response.status_code, content_type, body, raw)


def run_corpus(root_url: str, headers: dict[str, str] | None = None,
               corpus: list[Req] = CORPUS) -> dict[str, Answer]:
    """Send the corpus, one request at a time, in order."""
    ids: dict[str, str] = {}
    answers: dict[str, Answer] = {}
    with httpx.Client(base_url=root_url, headers=headers or {}, timeout=180) as client:
        for req in corpus:
            try:
                answers[req.name] = send(client, req, ids)
            except KeyError as missing:  # an earlier request gave no id
                answers[req.name] = Answer(0, "", f"no id from {missing}")
    return answers


def _diff(a: Any, b: Any, where: str, out: list[str], tol: float = 1e-3) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                out.append(f"{where}.{key}: only in {'bare' if key in a else 'ours'}: "
                           f"{_short(a.get(key, b.get(key)))}")
            else:
                _diff(a[key], b[key], f"{where}.{key}", out, tol)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: length {len(a)} (bare) != {len(b)} (ours): {_short(a)} vs {_short(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out, tol)
    elif isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        if abs(a - b) > tol * max(1.0, abs(a)):
            out.append(f"{where}: {a!r} (bare) != {b!r} (ours)")
    elif a != b:
        out.append(f"{where}: {_short(a)} (bare) != {_short(b)} (ours)")


def _short(value: Any, limit: int = 300) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def compare(bare: dict[str, Answer], ours: dict[str, Answer],
            deliberate: dict[str, tuple[str, Callable]] | None = None) -> list[str]:
    """Every difference between two corpus runs, as lines "request: what differs"."""
    mismatches: list[str] = []
    for name, a in bare.items():
        b = ours.get(name)
        if b is None:
            mismatches.append(f"{name}: no answer from ours")
            continue
        if deliberate and name in deliberate:
            mismatches += [f"{name} (deliberate: {deliberate[name][0]}): {p}" for p in deliberate[name][1](b, a)]
            continue
        found: list[str] = []
        if a.status != b.status:
            found.append(f"status {a.status} (bare) != {b.status} (ours): ours said {_short(b.body)}")
        elif a.content_type != b.content_type:
            found.append(f"content type {a.content_type!r} (bare) != {b.content_type!r} (ours)")
        elif a.status >= 400:
            ea, eb = _error_of(a), _error_of(b)
            if not ea and isinstance(a.body, dict) and "detail" in a.body:
                _diff(normalise(a.body), normalise(b.body), "body", found)
            else:
                for key in ("type", "message", "param", "code"):
                    _diff(normalise(ea.get(key)), normalise(eb.get(key)), f"error.{key}", found)
        else:
            _diff(normalise(a.body), normalise(b.body), "body", found)
        mismatches += [f"{name}: {line}" for line in found]
    return mismatches


@pytest.fixture(scope="module")
def bare_answers(bare_vllm) -> dict[str, Answer]:
    return run_corpus(bare_vllm.root_url)


def test_corpus_is_large_enough():
    bad = [r for r in CORPUS if r.name.startswith("bad_")]
    good = [r for r in CORPUS if not r.name.startswith(("bad_", "diff_"))]
    assert len(good) >= 40 and len(bad) >= 12
    assert all(r.expect >= 400 for r in bad) and sum(r.stream for r in good) >= 12
    assert len({r.name for r in CORPUS}) == len(CORPUS), "request names must be unique"
    assert set(DELIBERATE) <= {r.name for r in CORPUS}


def test_corpus_is_deterministic_on_bare_vllm(bare_vllm, bare_answers):
    """The corpus itself: each request gets the status it is meant to get from bare vLLM, good
    requests produce what they are meant to (streams end in [DONE], tool choices that force a
    call stream tool-call deltas), and a second run answers the same."""
    problems = [f"{r.name}: status {bare_answers[r.name].status}, expected {r.expect}: "
                f"{_short(bare_answers[r.name].body)}" for r in CORPUS if bare_answers[r.name].status != r.expect]
    for r in CORPUS:
        answer = bare_answers[r.name]
        if r.stream and answer.status == 200:
            summary = answer.body
            if r.path != "/v1/messages" and not summary.get("done") and r.path != "/v1/responses":
                problems.append(f"{r.name}: stream did not end with [DONE]")
            if summary.get("errors"):
                problems.append(f"{r.name}: stream carried errors {summary['errors']}")
            if r.path in ("/v1/chat/completions", "/v1/completions") and not summary.get("usage"):
                problems.append(f"{r.name}: no usage in a stream that asked for it")
        if r.expect >= 400 and not _error_of(answer) and "detail" not in (answer.body or {}):
            problems.append(f"{r.name}: error without an error envelope: {_short(answer.body)}")
    for name in ("chat_tools_named_stream", "chat_tools_required_stream"):
        calls = bare_answers[name].body["choices"]["0"]["tool_calls"]
        if not calls or calls["0"]["name"] != "get_weather":
            problems.append(f"{name}: expected a streamed get_weather tool call, got {calls}")
    again = run_corpus(bare_vllm.root_url)
    problems += [f"not deterministic: {line}" for line in compare(bare_answers, again)]
    assert not problems, "\n".join(problems)


def test_rayllm_answers_like_bare_vllm(bare_answers, served_app):
    ours = run_corpus(served_app.root_url, served_app.headers)
    mismatches = compare(bare_answers, ours, DELIBERATE)
    assert not mismatches, f"{len(mismatches)} mismatch(es) with bare vLLM:\n" + "\n".join(mismatches)


if __name__ == "__main__":  # python -m tests.e2e.test_vllm_parity_e2e ROOT_URL [API_KEY] [--twice]
    url = sys.argv[1]
    key = next((a for a in sys.argv[2:] if not a.startswith("--")), None)
    first = run_corpus(url, {"Authorization": f"Bearer {key}"} if key else None)
    for req in CORPUS:
        ans = first[req.name]
        flag = "" if ans.status == req.expect else f"  <-- expected {req.expect}"
        print(f"{ans.status} {req.name}{flag}: {_short(ans.body, 400)}")
    if "--twice" in sys.argv:
        print("\n".join(compare(first, run_corpus(url, {"Authorization": f"Bearer {key}"} if key else None)))
              or "deterministic")

"""The replica's side of shared stored Responses, around a stand-in for vLLM's application
and dicts (the real engine's path is tests/e2e/test_responses_state_e2e.py): what is loaded,
when it is written, and that vLLM's dicts do not keep what the store holds."""

from __future__ import annotations

import asyncio
import json

from rayllm_app.conversations import StoredResponse
from rayllm_app.replica.http_forward import ForwardedRequest, call_asgi
from rayllm_app.replica.responses_state import OWNER_HEADER, ResponsesState


class Dicts:
    """vLLM's response_store/msg_store, as VLLMEngine exposes them."""

    def __init__(self) -> None:
        self.responses: dict[str, bytes] = {}
        self.messages: dict[str, bytes] = {}
        self.loads: list[str] = []

    def holds_response(self, response_id):
        return response_id in self.responses

    def stored_response(self, response_id):
        if response_id not in self.responses:
            return None
        return self.responses[response_id], self.messages[response_id]

    def hold_response(self, response_id, response, messages):
        self.loads.append(response_id)
        self.responses[response_id], self.messages[response_id] = response, messages

    def drop_response(self, response_id):
        self.responses.pop(response_id, None)
        self.messages.pop(response_id, None)


class Store:
    def __init__(self, fail: bool = False) -> None:
        self.items: dict[str, StoredResponse] = {}
        self.log: list[str] = []
        self.fail = fail

    async def put(self, item):
        if self.fail:
            raise ConnectionError("store down")
        self.log.append(f"put {item.response_id}")
        self.items[item.response_id] = item

    async def get(self, response_id):
        if self.fail:
            raise ConnectionError("store down")
        return self.items.get(response_id)

    async def delete(self, response_id):
        return self.items.pop(response_id, None) is not None

    async def close(self):
        pass


def vllm_app(dicts: Dicts, log: list[str], chunks: int = 3, gate: asyncio.Event | None = None):
    """Answers like vLLM's Responses stream: stores the response before its completed event,
    and says which previous response it saw."""

    async def app(scope, receive, send):
        body = json.loads((await receive())["body"])
        previous = body.get("previous_response_id")
        if previous and previous not in dicts.responses:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"not found", "more_body": False})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for index in range(chunks - 1):
            await send({"type": "http.response.body", "body": f"event: delta {index}\n\n".encode(), "more_body": True})
            if gate is not None:
                await gate.wait()
        if body.get("store", True):
            dicts.responses[body["request_id"]] = json.dumps({"id": body["request_id"], "prev": previous}).encode()
            dicts.messages[body["request_id"]] = b'[{"role": "user"}]'
        log.append("send completed")
        await send({"type": "http.response.body", "body": b"event: response.completed\n\n", "more_body": False})
    return app


def request(response_id: str, previous: str | None = None, owner: str | None = "alice", **extra) -> ForwardedRequest:
    body = {"model": "tiny", "input": "hi", "stream": True, "request_id": response_id, **extra}
    if previous:
        body["previous_response_id"] = previous
    headers = (("content-type", "application/json"),) + (((OWNER_HEADER, owner),) if owner else ())
    return ForwardedRequest("POST", "/v1/responses", json.dumps(body).encode(), "", headers)


async def answer(state: ResponsesState, app, forwarded: ForwardedRequest) -> tuple[int, bytes]:
    status, body = 0, b""
    async for item in call_asgi(state.wrap(app), forwarded):
        if isinstance(item, bytes):
            body += item
        else:
            status, body = item.status_code, body + item.body
    return status, body


def test_a_stored_response_reaches_the_store_before_its_completed_event_and_leaves_vllm():
    dicts, store, log = Dicts(), Store(), []
    state = ResponsesState(store, dicts, "tiny")
    store.log = log
    status, body = asyncio.run(answer(state, vllm_app(dicts, log), request("resp_a")))
    assert status == 200 and body.endswith(b"event: response.completed\n\n")
    assert log == ["send completed", "put resp_a"]  # written once, when vLLM had stored it
    stored = store.items["resp_a"]
    assert (stored.model, stored.owner, stored.messages) == ("tiny", "alice", b'[{"role": "user"}]')
    assert json.loads(stored.response)["id"] == "resp_a"
    assert dicts.responses == {} and dicts.messages == {}  # the store holds it; vLLM's dicts never shrink


def test_the_store_has_it_before_the_client_reads_the_last_event():
    dicts, store = Dicts(), Store()
    state = ResponsesState(store, dicts, "tiny")
    seen_at_completed = []

    async def body():
        async for item in call_asgi(state.wrap(vllm_app(dicts, [])), request("resp_b")):
            if isinstance(item, bytes) and b"response.completed" in item:
                seen_at_completed.append("resp_b" in store.items)
    asyncio.run(body())
    assert seen_at_completed == [True]


def test_a_continuation_loads_the_previous_response_once_and_drops_it_after():
    dicts, store = Dicts(), Store()
    store.items["resp_prev"] = StoredResponse("resp_prev", "tiny", "alice", b'{"id": "resp_prev"}', b"[]")
    state = ResponsesState(store, dicts, "tiny")
    status, _ = asyncio.run(answer(state, vllm_app(dicts, []), request("resp_next", previous="resp_prev")))
    assert status == 200
    assert dicts.loads == ["resp_prev"]
    assert json.loads(store.items["resp_next"].response)["prev"] == "resp_prev"
    assert dicts.responses == {}


def test_another_keys_response_is_not_found_and_never_loaded():
    dicts, store = Dicts(), Store()
    store.items["resp_prev"] = StoredResponse("resp_prev", "tiny", "alice", b"{}", b"[]")
    state = ResponsesState(store, dicts, "tiny")
    status, body = asyncio.run(answer(state, vllm_app(dicts, []), request("resp_x", previous="resp_prev", owner="bob")))
    assert status == 404 and json.loads(body)["error"]["message"] == "Response with id 'resp_prev' not found."
    assert dicts.loads == [] and "resp_x" not in store.items


def test_concurrent_continuations_share_one_load_and_the_last_one_drops_it():
    dicts, store = Dicts(), Store()
    store.items["resp_prev"] = StoredResponse("resp_prev", "tiny", None, b"{}", b"[]")
    state = ResponsesState(store, dicts, "tiny")
    gate = asyncio.Event()

    async def body():
        app = vllm_app(dicts, [], gate=gate)
        first = asyncio.ensure_future(answer(state, app, request("resp_1", previous="resp_prev", owner="bob")))
        second = asyncio.ensure_future(answer(state, app, request("resp_2", previous="resp_prev", owner="carol")))
        await asyncio.sleep(0.05)
        assert dicts.holds_response("resp_prev")  # both in flight: loaded once, held
        gate.set()
        return await asyncio.gather(first, second)
    results = asyncio.run(body())
    assert [status for status, _ in results] == [200, 200]
    assert dicts.loads == ["resp_prev"]
    assert not dicts.holds_response("resp_prev") and dicts.responses == {}


def test_with_the_store_down_vllm_keeps_the_response_as_it_would_alone():
    dicts, store = Dicts(), Store(fail=True)
    state = ResponsesState(store, dicts, "tiny")
    status, _ = asyncio.run(answer(state, vllm_app(dicts, []), request("resp_local")))
    assert status == 200 and dicts.holds_response("resp_local")
    status, _ = asyncio.run(answer(state, vllm_app(dicts, []), request("resp_more", previous="resp_local")))
    assert status == 200  # continued on this replica, from vLLM's own copy


def test_store_false_and_background_responses_are_not_exported():
    dicts, store = Dicts(), Store()
    state = ResponsesState(store, dicts, "tiny")
    asyncio.run(answer(state, vllm_app(dicts, []), request("resp_nostore", store=False)))
    asyncio.run(answer(state, vllm_app(dicts, []), request("resp_bg", background=True)))
    assert store.items == {} and dicts.holds_response("resp_bg")


def test_a_stored_response_is_loaded_for_its_cancel_and_released_after():
    """vLLM answers a cancel (or GET) of a response it does not hold with 404; loaded from the
    store it gives its own answer, e.g. 400 for one that is not running."""
    dicts, store = Dicts(), Store()
    store.items["resp_done"] = StoredResponse("resp_done", "tiny", "alice", b"{}", b"[]")
    state = ResponsesState(store, dicts, "tiny")
    seen = []

    async def vllm_cancel(scope, receive, send):
        response_id = scope["path"].split("/")[3]
        seen.append(dicts.holds_response(response_id))
        status = 400 if dicts.holds_response(response_id) else 404
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    def cancel(owner: str) -> int:
        forwarded = ForwardedRequest("POST", "/v1/responses/resp_done/cancel", b"", "", ((OWNER_HEADER, owner),))

        async def run():
            async for item in call_asgi(state.wrap_stored(vllm_cancel), forwarded):
                return item.status_code
        return asyncio.run(run())

    assert cancel("alice") == 400 and seen == [True]
    assert not dicts.holds_response("resp_done")  # released after
    assert cancel("bob") == 404 and seen == [True]  # another key's: never loaded

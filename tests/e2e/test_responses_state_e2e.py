"""End to end: stored Responses live in the store every router and replica shares (issue 17,
part 3), here the embedded one (a Ray actor with an SQLite file), as the session's app runs
by default. The same path with Redis, after the response's replicas were killed, is in
test_migration_e2e.py (that app has two replicas to kill).

The replica drops a response from vLLM's memory once the store has it, so every retrieval
and continuation below is served from the store, not from where the first turn ran.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import API_KEY, LIMITED_KEY, TINY_A, TINY_B, TINY_TOOLS

pytestmark = pytest.mark.e2e

TURN = {"max_output_tokens": 12, "temperature": 0}
DONE = ("completed", "incomplete")  # incomplete: max_output_tokens reached, as random weights do


def _two_turns(client) -> tuple:
    first = client.responses.create(model=TINY_TOOLS, input="Name a city in France.", store=True, **TURN)
    second = client.responses.create(model=TINY_TOOLS, input="And one in Spain?", previous_response_id=first.id,
                                     **TURN)
    return first, second


def test_a_continuation_equals_bare_vllms_own(served_app, bare_vllm):
    """The second turn, rendered from the stored messages and output, is what bare vLLM answers
    from its own memory: same text, same token counts (so the same prompt)."""
    ours, bare = _two_turns(served_app.client()), _two_turns(bare_vllm.client())
    for mine, theirs in zip(ours, bare):
        assert (mine.status, mine.output_text, mine.usage.model_dump()) == \
               (theirs.status, theirs.output_text, theirs.usage.model_dump())
    assert ours[1].previous_response_id == ours[0].id
    # The continuation's prompt holds the first turn: more input tokens than the first turn's whole.
    assert ours[1].usage.input_tokens > ours[0].usage.total_tokens


def test_a_streamed_response_can_be_continued_the_moment_it_completes(served_app):
    """The replica writes the response to the store before its response.completed event
    leaves: a client continuing at once finds it, on any replica, every time."""
    client = served_app.client()
    previous = None
    for turn in range(4):
        with client.responses.stream(model=TINY_A, input=f"Turn {turn}.", previous_response_id=previous,
                                     **TURN) as stream:
            final = stream.get_final_response()
        assert final.status in DONE and final.output_text
        previous = final.id
    assert client.responses.retrieve(previous).output_text == final.output_text


def test_retrieve_and_delete_come_from_the_store(served_app):
    client = served_app.client()
    first = client.responses.create(model=TINY_A, input="Say something.", store=True, **TURN)
    got = client.responses.retrieve(first.id)
    assert (got.id, got.output_text, got.usage.model_dump()) == (first.id, first.output_text, first.usage.model_dump())
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError, match=f"Response with id '{first.id}' not found"):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError, match=f"Response with id '{first.id}' not found"):
        client.responses.create(model=TINY_A, input="more", previous_response_id=first.id, **TURN)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(first.id)
    # store=false: nothing to retrieve.
    unstored = client.responses.create(model=TINY_A, input="Say something.", store=False, **TURN)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_another_key_cannot_read_continue_or_delete_a_response(served_app):
    """A stored response belongs to the key that created it; to any other it does not exist."""
    owner, other = served_app.client(api_key=LIMITED_KEY), served_app.client(api_key=API_KEY)
    mine = owner.responses.create(model=TINY_A, input="Private note.", store=True, **TURN)
    for attempt in (lambda: other.responses.retrieve(mine.id),
                    lambda: other.responses.create(model=TINY_A, input="x", previous_response_id=mine.id, **TURN),
                    lambda: other.responses.delete(mine.id)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert owner.responses.retrieve(mine.id).output_text == mine.output_text  # still there for its owner
    follow = owner.responses.create(model=TINY_A, input="Go on.", previous_response_id=mine.id, **TURN)
    assert follow.status in DONE


def test_a_response_continues_on_another_model(served_app):
    """The store holds the conversation, not a replica's memory: another model (another
    deployment, which never saw the first turn) continues it, rendered with its own template."""
    client = served_app.client()
    first = client.responses.create(model=TINY_A, input="Hello there.", store=True, **TURN)
    second = client.responses.create(model=TINY_B, input="Continue.", previous_response_id=first.id,
                                     max_output_tokens=5)
    assert second.status in DONE and second.model == TINY_B
    assert second.usage.input_tokens > first.usage.input_tokens


def test_delete_of_an_unknown_id_is_a_404_in_openais_shape(served_app):
    response = httpx.delete(f"{served_app.base_url}/responses/resp_does_not_exist", headers=served_app.headers,
                            timeout=60)
    assert response.status_code == 404
    error = json.loads(response.content)["error"]
    assert error["message"] == "Response with id 'resp_does_not_exist' not found."

"""One suite for every responses store: the SQLite file (``ResponseFile``, as the embedded
actor runs it), ``RedisResponseStore`` on a real redis-server, and (e2e, on the session's Ray
cluster) ``EmbeddedResponseStore``'s actor itself."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from rayllm_app.conversations import StoredResponse, open_response_store, visible
from rayllm_app.conversations.embedded_store import EmbeddedResponseStore, ResponseFile


class FileStore:
    """``ResponseFile`` (synchronous, as in the actor) behind the async store interface."""

    def __init__(self, path: Path, ttl_s: float) -> None:
        self.file = ResponseFile(str(path), ttl_s)

    async def put(self, item):
        self.file.put(item)

    async def get(self, response_id):
        return self.file.get(response_id)

    async def delete(self, response_id):
        return self.file.delete(response_id)

    async def close(self):
        pass


@pytest.fixture(params=["file", "redis"])
def make_store(request, tmp_path: Path):
    """``make_store(ttl_s)``: a fresh store of the parametrized kind."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None

    def make(ttl_s: float = 60.0):
        if url is None:
            return FileStore(tmp_path / "responses.sqlite3", ttl_s)
        return open_response_store(url, ttl_s=ttl_s, prefix=f"test-{uuid.uuid4().hex[:8]}:")
    return make


def item(response_id: str = "resp_1", owner: str | None = "alice", text: str = "hi") -> StoredResponse:
    return StoredResponse(response_id, "tiny", owner, f'{{"id":"{response_id}","text":"{text}"}}'.encode(),
                          b'[{"role":"user","content":"hi \\u00e9"}]')


async def _roundtrip(store) -> None:
    assert await store.get("resp_1") is None
    await store.put(item())
    assert await store.get("resp_1") == item()
    await store.put(item(owner=None, text="again"))  # replaced whole: the owner goes too
    assert await store.get("resp_1") == item(owner=None, text="again")
    assert await store.delete("resp_1") is True
    assert await store.get("resp_1") is None
    assert await store.delete("resp_1") is False


def test_put_get_replace_delete(make_store):
    store = make_store()
    asyncio.run(_closing(store, _roundtrip(store)))


def test_a_response_expires_after_the_ttl(make_store):
    store = make_store(ttl_s=1.0)

    async def body():
        await store.put(item("resp_old"))
        assert (await store.get("resp_old")) is not None
        await asyncio.sleep(1.3)
        assert await store.get("resp_old") is None
        assert await store.delete("resp_old") is False  # an expired one is gone for delete too
    asyncio.run(_closing(store, body()))


def test_the_file_keeps_responses_across_a_restart(tmp_path: Path):
    """The embedded actor comes back on the head node with everything written so far."""
    first = ResponseFile(str(tmp_path / "r.sqlite3"), 60)
    first.put(item("resp_kept"))
    again = ResponseFile(str(tmp_path / "r.sqlite3"), 60)
    assert again.get("resp_kept") == item("resp_kept")


def test_only_the_key_that_created_a_response_sees_it():
    assert visible("alice", "alice") and not visible("alice", "bob") and not visible("alice", None)
    assert visible(None, None) and visible(None, "bob")  # made on a server without keys
    assert item(owner="alice").visible_to("alice") and not item(owner="alice").visible_to("bob")


def test_an_unknown_store_url_says_what_is_accepted():
    with pytest.raises(ValueError, match="embedded.*redis://"):
        open_response_store("postgres://db/responses")


@pytest.mark.e2e
def test_the_embedded_actor_is_shared_by_path(ray_cluster, tmp_path: Path):
    """Two handles on one file reach the same actor; another file is another actor."""
    path = str(tmp_path / "shared.sqlite3")
    one, two = EmbeddedResponseStore(path, 60), EmbeddedResponseStore(path, 60)
    other = EmbeddedResponseStore(str(tmp_path / "other.sqlite3"), 60)

    async def body():
        await one.put(item("resp_shared"))
        assert await two.get("resp_shared") == item("resp_shared")
        assert await other.get("resp_shared") is None
        assert await two.delete("resp_shared") and await one.get("resp_shared") is None
    asyncio.run(asyncio.wait_for(body(), 60))
    assert one.name == two.name != other.name


async def _closing(store, body) -> None:
    try:
        await asyncio.wait_for(body, 20)
    finally:
        await store.close()


def test_ttl_is_counted_from_each_write(make_store):
    """A replaced response gets a fresh ttl (a continuation's chain is written anew)."""
    store = make_store(ttl_s=1.5)

    async def body():
        await store.put(item("resp_x"))
        await asyncio.sleep(0.9)
        await store.put(item("resp_x", text="newer"))
        await asyncio.sleep(0.9)  # 1.8 s after the first write, 0.9 s after the second
        got = await store.get("resp_x")
        assert got is not None and b"newer" in got.response
    started = time.monotonic()
    asyncio.run(_closing(store, body()))
    assert time.monotonic() - started < 10

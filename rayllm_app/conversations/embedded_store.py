"""The embedded responses store: one Ray actor with an SQLite file, so stored responses
outlive any model replica, and a Ray restart, with no extra service.

Every router and model replica finds the same actor by name (rayllm_app.named_actor); the
name includes the file's path, so two apps with two files never share one. It lives on the
head node, beside its file: if it dies it comes back there with everything written so far. Its methods are synchronous and run one at a
time, the way SQLite likes to be used.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time

import ray

from rayllm_app.conversations.store import StoredResponse
from rayllm_app.named_actor import NamedActor

ACTOR_NAMESPACE = "rayllm"
DEFAULT_PATH = os.path.join("~", ".cache", "rayllm", "responses.sqlite3")
PURGE_EVERY = 1000  # writes between sweeps of expired rows


class ResponseFile:
    """The SQLite table; runs inside the actor (and, in unit tests, as a plain object)."""

    def __init__(self, path: str, ttl_s: float) -> None:
        path = os.path.expanduser(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.ttl_s = ttl_s
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit: each write is durable
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, model TEXT NOT NULL, "
                         "owner TEXT, response BLOB NOT NULL, messages BLOB NOT NULL, expires REAL NOT NULL)")
        self._writes = 0

    def put(self, item: StoredResponse) -> None:
        now = time.time()
        self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                         (item.response_id, item.model, item.owner, item.response, item.messages, now + self.ttl_s))
        self._writes += 1
        if self._writes % PURGE_EVERY == 0:
            self._db.execute("DELETE FROM responses WHERE expires < ?", (now,))

    def get(self, response_id: str) -> StoredResponse | None:
        row = self._db.execute("SELECT model, owner, response, messages FROM responses WHERE id = ? AND expires >= ?",
                               (response_id, time.time())).fetchone()
        return None if row is None else StoredResponse(response_id, row[0], row[1], bytes(row[2]), bytes(row[3]))

    def delete(self, response_id: str) -> bool:
        return self._db.execute("DELETE FROM responses WHERE id = ? AND expires >= ?",
                                (response_id, time.time())).rowcount > 0


ResponseFileActor = ray.remote(ResponseFile)


class EmbeddedResponseStore:
    """``ResponseStore`` on the shared actor of one file."""

    def __init__(self, path: str | None, ttl_s: float) -> None:
        self.path = os.path.expanduser(path or DEFAULT_PATH)
        self.name = "rayllm-responses-" + hashlib.sha256(self.path.encode()).hexdigest()[:12]
        self._actor = NamedActor(ResponseFileActor, self.name, ACTOR_NAMESPACE, self.path, ttl_s,
                                 resources={"node:__internal_head__": 0.001})

    async def put(self, item: StoredResponse) -> None:
        await self._actor.call("put", item)

    async def get(self, response_id: str) -> StoredResponse | None:
        return await self._actor.call("get", response_id)

    async def delete(self, response_id: str) -> bool:
        return await self._actor.call("delete", response_id)

    async def close(self) -> None:
        self._actor.forget()  # the actor and its file stay: other routers and replicas share them

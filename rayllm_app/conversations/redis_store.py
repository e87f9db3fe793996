"""The Redis responses store: one hash per response, ``{prefix}response:{id}`` with fields
``model``, ``owner``, ``response`` and ``messages``, expiring after the store's ttl.

Written in one MULTI (HSET, then PEXPIRE), so no reader sees a response without its
expiry. Works on a standalone Redis, Sentinel or Redis Cluster (one key per response).
"""

from __future__ import annotations

from rayllm_app.conversations.store import StoredResponse


class RedisResponseStore:
    def __init__(self, url: str, ttl_s: float, prefix: str = "rayllm:", *, connect_timeout_s: float = 0.5,
                 timeout_s: float = 2.0) -> None:
        from redis.asyncio import Redis

        self.prefix = prefix
        self.ttl_ms = max(int(ttl_s * 1000), 1)
        self._client = Redis.from_url(url, socket_connect_timeout=connect_timeout_s, socket_timeout=timeout_s)

    def _key(self, response_id: str) -> str:
        return f"{self.prefix}response:{response_id}"

    async def put(self, item: StoredResponse) -> None:
        key = self._key(item.response_id)
        fields = {"model": item.model, "response": item.response, "messages": item.messages}
        if item.owner is not None:
            fields["owner"] = item.owner
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.delete(key)  # a replaced response loses an owner it no longer has
            pipe.hset(key, mapping=fields)
            pipe.pexpire(key, self.ttl_ms)
            await pipe.execute()

    async def get(self, response_id: str) -> StoredResponse | None:
        fields = await self._client.hgetall(self._key(response_id))
        if not fields or b"response" not in fields:
            return None
        owner = fields.get(b"owner")
        return StoredResponse(response_id, fields[b"model"].decode(), owner.decode() if owner is not None else None,
                              fields[b"response"], fields.get(b"messages", b"[]"))

    async def delete(self, response_id: str) -> bool:
        return bool(await self._client.delete(self._key(response_id)))

    async def close(self) -> None:
        await self._client.aclose()

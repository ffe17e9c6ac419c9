"""Redis hashes for :class:`~botonera_bridge.queues.state.HashStore`, through the shared link."""

from __future__ import annotations

from ..errors import RedisError
from .link import RedisLink
from .redis_client import Redis


class RedisHashes:
    def __init__(self, link: RedisLink) -> None:
        self._link = link

    def _redis(self) -> Redis:
        if not self._link.up or self._link.redis is None:
            raise RedisError("Redis unavailable")
        return self._link.redis

    async def hgetall(self, key: str) -> dict[str, bytes]:
        try:
            flat = await self._redis().execute("HGETALL", key)
            return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}
        except (TypeError, AttributeError, IndexError, UnicodeDecodeError) as exc:
            err = RedisError(f"unexpected HGETALL reply for {key}: {exc!r}")
            self._link.down(err)
            raise err from exc
        except RedisError as exc:
            self._link.down(exc)
            raise

    async def hset(self, key: str, mapping: dict[str, bytes]) -> None:
        args: list[str | bytes] = []
        for k, v in mapping.items():
            args += [k, v]
        try:
            await self._redis().execute("HSET", key, *args)
        except RedisError as exc:
            self._link.down(exc)
            raise

    async def hdel(self, key: str, fields: list[str]) -> None:
        try:
            await self._redis().execute("HDEL", key, *fields)
        except RedisError as exc:
            self._link.down(exc)
            raise

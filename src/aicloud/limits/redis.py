"""The same buckets in Redis, so every server process shares one limit. Each call is one
Lua script: atomic across processes, one round trip, and timed by Redis's own clock so
processes with skewed clocks still agree."""

from __future__ import annotations

from redis.asyncio import Redis

from aicloud.limits.buckets import Outcome, Take

TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels, wait = {}, 0
for i = 1, #KEYS do
  local limit, cost = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local rate = limit / 60.0
  local state = redis.call('HMGET', KEYS[i], 'level', 'at')
  local level = tonumber(state[1]) or limit
  local at = tonumber(state[2]) or now
  level = math.min(limit, level + math.max(0, now - at) * rate)
  levels[i] = level
  if cost > level then wait = math.max(wait, (cost - level) / rate) end
end
local out = {wait == 0 and 1 or 0, tostring(wait)}
for i = 1, #KEYS do
  local limit, cost = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local level = levels[i]
  if wait == 0 then level = level - cost end
  redis.call('HSET', KEYS[i], 'level', tostring(level), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[i], 120)
  out[#out + 1] = tostring(level)
end
return out
"""

GIVE_BACK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 1, #KEYS do
  local limit, amount = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local state = redis.call('HMGET', KEYS[i], 'level', 'at')
  local level = tonumber(state[1]) or limit
  local at = tonumber(state[2]) or now
  level = math.min(limit, level + math.max(0, now - at) * limit / 60.0 + amount)
  redis.call('HSET', KEYS[i], 'level', tostring(level), 'at', tostring(now))
  redis.call('EXPIRE', KEYS[i], 120)
end
return 1
"""


def _args(takes: list[Take]) -> list[int]:
    return [n for t in takes for n in (t.limit, t.cost)]


class RedisLimiter:
    def __init__(self, url: str, namespace: str = "aicloud:rl:") -> None:
        self._redis = Redis.from_url(url)
        self._namespace = namespace
        self._take = self._redis.register_script(TAKE)
        self._give_back = self._redis.register_script(GIVE_BACK)

    def _keys(self, takes: list[Take]) -> list[str]:
        return [self._namespace + t.key for t in takes]

    async def take(self, takes: list[Take]) -> Outcome:
        if not takes:
            return Outcome(True, 0.0, ())
        out = await self._take(keys=self._keys(takes), args=_args(takes))
        return Outcome(int(out[0]) == 1, float(out[1]), tuple(float(x) for x in out[2:]))

    async def give_back(self, takes: list[Take]) -> None:
        if takes:
            await self._give_back(keys=self._keys(takes), args=_args(takes))

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()

-- Return expired leases (deadline passed, by Redis TIME) to the queue with attempts + 1, or
-- past the attempt limit to the dead set. Any worker may run it; it is cheap when nothing
-- expired (one ZRANGEBYSCORE).
--
-- KEYS: 1 queue, 2 leased, 3 leases, 4 attempts, 5 dead, 6 events
-- ARGV: 1 max attempts, 2 events maxlen, 3 most leases to reap in one call
-- Returns the number of leases reaped
local queue, leased, leases, attempts, dead, events =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local max_attempts = tonumber(ARGV[1])
local now_ms = redis_now_ms()

local expired = redis.call('ZRANGEBYSCORE', leased, '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[3]))
for _, case_id in ipairs(expired) do
  local record = redis.call('HGET', leases, case_id)
  local lease = record and cmsgpack.unpack(record) or {worker = '?', score = '0'}
  local tries = redis.call('HINCRBY', attempts, case_id, 1)
  local error = 'lease expired (held by ' .. lease.worker .. ')'
  redis.call('ZREM', leased, case_id)
  redis.call('HDEL', leases, case_id)
  redis.call('XADD', events, 'MAXLEN', '~', ARGV[2], '*', 'type', 'lease_expired',
    'at_ms', now_ms, 'case_id', case_id, 'attempts', tries, 'worker', lease.worker)
  if tries >= max_attempts then
    redis.call('HSET', dead, case_id, error)
    redis.call('XADD', events, 'MAXLEN', '~', ARGV[2], '*', 'type', 'case_dead',
      'at_ms', now_ms, 'case_id', case_id, 'attempts', tries, 'error', error)
  else
    redis.call('ZADD', queue, lease.score, case_id)
  end
end
return #expired

-- Return leased cases to the queue at their old score: after a failed attempt (attempts + 1,
-- and past the limit to the dead set with the error), or handed back by a worker that is
-- shutting down (no attempt counted). Only the current holder can give a case back.
--
-- KEYS: 1 queue, 2 leased, 3 leases, 4 attempts, 5 dead, 6 events
-- ARGV: 1 max attempts, 2 events maxlen, 3 '1' to count an attempt else '0', 4 error,
--       5 worker, then per lease (2): case_id, token
-- Returns {case_id, 'queued' | 'dead' | 'fenced', ...}
local queue, leased, leases, attempts, dead, events =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local max_attempts, counted, error, worker = tonumber(ARGV[1]), ARGV[3] == '1', ARGV[4], ARGV[5]
local now_ms = redis_now_ms()

local reply = {}
for i = 6, #ARGV, 2 do
  local case_id, token = ARGV[i], tonumber(ARGV[i + 1])
  local record = redis.call('HGET', leases, case_id)
  local lease = record and cmsgpack.unpack(record)
  local outcome = 'fenced'
  if lease and lease.token == token then
    redis.call('ZREM', leased, case_id)
    redis.call('HDEL', leases, case_id)
    local tries = lease.attempts
    if counted then tries = redis.call('HINCRBY', attempts, case_id, 1) end
    if tries >= max_attempts then
      redis.call('HSET', dead, case_id, error)
      redis.call('XADD', events, 'MAXLEN', '~', ARGV[2], '*', 'type', 'case_dead',
        'at_ms', now_ms, 'case_id', case_id, 'attempts', tries, 'error', error, 'worker', worker)
      outcome = 'dead'
    else
      redis.call('ZADD', queue, lease.score, case_id)
      outcome = 'queued'
    end
  end
  table.insert(reply, case_id)
  table.insert(reply, outcome)
end
return reply

-- Lease the best `count` queued cases: move each from the queue to the leased set with a
-- deadline from Redis TIME, record who holds it, and hand out a fresh fencing token.
-- Nothing is popped for good: the reaper returns a lease that is not acked in time.
--
-- KEYS: 1 queue, 2 leased, 3 leases, 4 fencing, 5 attempts
-- ARGV: 1 worker, 2 lease ms, 3 count
-- Returns {case_id, token, attempts, score, deadline_ms, ...}
local queue, leased, leases, fencing, attempts = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local worker, lease_ms, count = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local deadline = now_ms + lease_ms

local picked = redis.call('ZREVRANGE', queue, 0, count - 1, 'WITHSCORES')
local reply = {}
for j = 1, #picked, 2 do
  local case_id, score = picked[j], picked[j + 1]
  local token = redis.call('INCR', fencing)
  local tries = tonumber(redis.call('HGET', attempts, case_id) or '0')
  redis.call('ZREM', queue, case_id)
  redis.call('ZADD', leased, deadline, case_id)
  redis.call('HSET', leases, case_id, cmsgpack.pack({
    token = token, worker = worker, attempts = tries, score = score, claimed_at_ms = now_ms
  }))
  for _, value in ipairs({case_id, token, tries, score, deadline}) do
    table.insert(reply, value)
  end
end
return reply

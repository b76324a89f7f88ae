-- Lease the best `count` queued cases: move each from the queue to the leased set with a
-- deadline from Redis TIME, record who holds it, and hand out a fresh fencing token.
-- Nothing is popped for good: the reaper returns a lease that is not acked in time.
-- A held-out case (the first 32 bits of the SHA-1 of its id below the threshold; the same
-- rule as store/queue.py is_held_out) is never leased: it goes to done untrained and is
-- counted, so it stays an honest judge of the models and conservation still holds.
--
-- KEYS: 1 queue, 2 leased, 3 leases, 4 fencing, 5 attempts, 6 done, 7 stats
-- ARGV: 1 worker, 2 lease ms, 3 count, 4 held-out threshold (0: none), 5 held-out stat field
-- Returns {case_id, token, attempts, score, deadline_ms, ...}
local queue, leased, leases, fencing, attempts, done, stats =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local worker, lease_ms, count = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local threshold, held_out_stat = tonumber(ARGV[4]), ARGV[5]

local now_ms = redis_now_ms()
local deadline = now_ms + lease_ms

local reply = {}
local leased_count = 0
-- Each pass removes what it picked from the queue, so this ends.
while leased_count < count do
  local picked = redis.call('ZREVRANGE', queue, 0, count - leased_count - 1, 'WITHSCORES')
  if #picked == 0 then break end
  for j = 1, #picked, 2 do
    local case_id, score = picked[j], picked[j + 1]
    redis.call('ZREM', queue, case_id)
    if held_out(case_id, threshold) then
      if redis.call('SADD', done, case_id) == 1 then
        redis.call('HINCRBY', stats, held_out_stat, 1)
      end
    else
      local token = redis.call('INCR', fencing)
      local tries = tonumber(redis.call('HGET', attempts, case_id) or '0')
      redis.call('ZADD', leased, deadline, case_id)
      redis.call('HSET', leases, case_id, cmsgpack.pack({
        token = token, worker = worker, attempts = tries, score = score, claimed_at_ms = now_ms
      }))
      for _, value in ipairs({case_id, token, tries, score, deadline}) do
        table.insert(reply, value)
      end
      leased_count = leased_count + 1
    end
  end
end
return reply

-- Lease the best `count` queued cases: move each from the queue to the leased set with a
-- deadline from Redis TIME, record who holds it, and hand out a fresh fencing token.
-- Nothing is popped for good: the reaper returns a lease that is not acked in time.
-- A held-out case (the first 32 bits of the SHA-1 of its id below the threshold; the same
-- rule as store/queue.py is_held_out) is never leased: it goes to done untrained and is
-- counted, so it stays an honest judge of the models and conservation still holds.
-- Everything is read and decided before the first write.
--
-- KEYS: 1 queue, 2 leased, 3 leases, 4 fencing, 5 attempts, 6 done, 7 stats, 8 retire
-- ARGV: 1 worker, 2 lease ms, 3 count, 4 held-out threshold (0: none), 5 held-out stat field
-- Returns {case_id, token, attempts, score, deadline_ms, ...}
local queue, leased, leases, fencing, attempts, done, stats, retire =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local worker, lease_ms, count = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local threshold, held_out_stat = tonumber(ARGV[4]), ARGV[5]

local now_ms = redis_now_ms()
local deadline = now_ms + lease_ms

-- 1. Pick: the best cases, skipping held-out ones, a page at a time from the top.
local picked, held = {}, {}
local offset = 0
while #picked < count do
  local page = redis.call('ZREVRANGE', queue, offset, offset + count - #picked - 1, 'WITHSCORES')
  if #page == 0 then break end
  offset = offset + #page / 2
  for j = 1, #page, 2 do
    if held_out(page[j], threshold) then
      table.insert(held, page[j])
    else
      table.insert(picked, {page[j], page[j + 1], tonumber(redis.call('HGET', attempts, page[j])) or 0})
    end
  end
end
local token = tonumber(redis.call('GET', fencing) or '0') or 0
local newly_held = 0
for _, case_id in ipairs(held) do
  if redis.call('SISMEMBER', done, case_id) == 0 then newly_held = newly_held + 1 end
end
local held_total = (tonumber(redis.call('HGET', stats, held_out_stat)) or 0) + newly_held

-- 2. Write.
for _, case_id in ipairs(held) do
  redis.call('ZREM', queue, case_id)
  redis.call('SADD', done, case_id)
  redis.call('ZADD', retire, now_ms, case_id)
end
if newly_held > 0 then
  redis.call('HSET', stats, held_out_stat, string.format('%d', held_total))
end
local reply = {}
for _, pick in ipairs(picked) do
  local case_id, score, tries = pick[1], pick[2], pick[3]
  token = token + 1
  redis.call('ZREM', queue, case_id)
  redis.call('ZADD', leased, deadline, case_id)
  redis.call('HSET', leases, case_id, cmsgpack.pack({
    token = token, worker = worker, attempts = tries, score = score, claimed_at_ms = now_ms
  }))
  for _, value in ipairs({case_id, token, tries, score, deadline}) do
    table.insert(reply, value)
  end
end
if #picked > 0 then redis.call('SET', fencing, string.format('%d', token)) end
return reply

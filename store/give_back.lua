-- Return leased cases to the queue at their old score: after a failed attempt (attempts + 1,
-- and past the limit to the dead set with the error), or handed back by a worker that is
-- shutting down (no attempt counted). Only the current holder can give a case back.
-- Every lease is read and decided before the first write.
--
-- KEYS: 1 queue, 2 leased, 3 leases, 4 attempts, 5 dead, 6 events, 7 retire
-- ARGV: 1 max attempts, 2 events maxlen, 3 '1' to count an attempt else '0', 4 error,
--       5 worker, then per lease (2): case_id, token
-- Returns {case_id, 'queued' | 'dead' | 'fenced', ...}
local queue, leased, leases, attempts, dead, events, retire =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local max_attempts, counted, error, worker = tonumber(ARGV[1]), ARGV[3] == '1', ARGV[4], ARGV[5]
local now_ms = redis_now_ms()

-- 1. Decide.
local plans = {}
for i = 6, #ARGV, 2 do
  local case_id, token = ARGV[i], tonumber(ARGV[i + 1])
  local lease = lease_record(leases, case_id)
  local plan = {case_id = case_id, outcome = 'fenced'}
  if lease and lease.token == token then
    local tries = tonumber(lease.attempts) or 0
    if counted then tries = (tonumber(redis.call('HGET', attempts, case_id)) or 0) + 1 end
    plan.tries, plan.score = tries, lease.score
    plan.outcome = tries >= max_attempts and 'dead' or 'queued'
  end
  table.insert(plans, plan)
end

-- 2. Write.
local reply = {}
for _, plan in ipairs(plans) do
  local case_id = plan.case_id
  if plan.outcome ~= 'fenced' then
    redis.call('ZREM', leased, case_id)
    redis.call('HDEL', leases, case_id)
    if counted then redis.call('HSET', attempts, case_id, plan.tries) end
  end
  if plan.outcome == 'dead' then
    redis.call('HSET', dead, case_id, error)
    redis.call('ZADD', retire, now_ms, case_id)
    redis.call('XADD', events, 'MAXLEN', '~', ARGV[2], '*', 'type', 'case_dead',
      'at_ms', now_ms, 'case_id', case_id, 'attempts', plan.tries, 'error', error, 'worker', worker)
  elseif plan.outcome == 'queued' then
    redis.call('ZADD', queue, plan.score, case_id)
  end
  table.insert(reply, case_id)
  table.insert(reply, plan.outcome)
end
return reply

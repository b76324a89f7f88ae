-- Return expired leases (deadline passed, by Redis TIME) to the queue with attempts + 1, or
-- past the attempt limit to the dead set. Any worker may run it; it is cheap when nothing
-- expired (one ZRANGEBYSCORE). Everything is read and decided before the first write.
--
-- With several partitions, the caller also names the leased cases a published checkpoint
-- already learned (their trainer died between its publish and its ack): those are finished,
-- not retried, so a case whose update is in the lineage never ends dead.
--
-- KEYS: 1 queue, 2 leased, 3 leases, 4 attempts, 5 dead, 6 events, 7 retire, 8 done,
--       9 rejected
-- ARGV: 1 max attempts, 2 events maxlen, 3 most leases to reap in one call, 4.. learned ids
-- Returns the number of leases reaped
local queue, leased, leases, attempts, dead, events, retire =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local k = {leased = leased, leases = leases, attempts = attempts, done = KEYS[8],
  rejected = KEYS[9], retire = retire}
local max_attempts, limit = tonumber(ARGV[1]), tonumber(ARGV[3])
local learned = {}
for i = 4, #ARGV do learned[ARGV[i]] = true end
local now_ms = redis_now_ms()

-- 1. Decide.
local plans = {}
for _, case_id in ipairs(redis.call('ZRANGEBYSCORE', leased, '-inf', now_ms, 'LIMIT', 0, limit)) do
  local lease = lease_record(leases, case_id) or {worker = '?'}
  local tries = (tonumber(redis.call('HGET', attempts, case_id)) or 0) + 1
  -- A lease without a readable record has no score to return to: the lowest of priority 1.
  local score = tonumber(lease.score) and lease.score or '100000'
  table.insert(plans, {case_id = case_id, worker = tostring(lease.worker), tries = tries,
    score = score, dead = tries >= max_attempts, learned = learned[case_id] == true})
end

-- 2. Write.
for _, plan in ipairs(plans) do
  local case_id = plan.case_id
  local error = 'lease expired (held by ' .. plan.worker .. ')'
  redis.call('ZREM', leased, case_id)
  redis.call('HDEL', leases, case_id)
  redis.call('HSET', attempts, case_id, plan.tries)
  redis.call('XADD', events, 'MAXLEN', '~', ARGV[2], '*', 'type', 'lease_expired',
    'at_ms', now_ms, 'case_id', case_id, 'attempts', plan.tries, 'worker', plan.worker)
  if plan.learned then
    finish_case(k, case_id, nil, '', '', now_ms)
  elseif plan.dead then
    redis.call('HSET', dead, case_id, error)
    redis.call('ZADD', retire, now_ms, case_id)
    redis.call('XADD', events, 'MAXLEN', '~', ARGV[2], '*', 'type', 'case_dead',
      'at_ms', now_ms, 'case_id', case_id, 'attempts', plan.tries, 'error', error)
  else
    redis.call('ZADD', queue, plan.score, case_id)
  end
end
return #plans

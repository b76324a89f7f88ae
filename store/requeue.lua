-- Put stored cases back on the queue at their priority (`negcase retrain-all`): done, dead
-- and queued cases are (re)queued, leased ones are left to their holder, and held-out cases
-- already done stay done (they are never trained; claim.lua would only move them back).
-- A case passed with its blob is restored first (from the archive into an empty Redis); an
-- existing blob wins. Everything is decided before the first write.
--
-- KEYS: 1 queue, 2 leased, 3 done, 4 dead, 5 rejected, 6 attempts, 7 cases, 8 retire,
--       9.. one case key per case, in ARGV order
-- ARGV: 1 held-out threshold (0: none), then per case (3): case_id, queue score,
--       blob ('' when it is already in Redis)
-- Returns the number of cases queued
local queue, leased, done, dead, rejected, attempts, cases, retire =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local threshold = tonumber(ARGV[1])

-- 1. Decide.
local requeue = {}
for i = 2, #ARGV, 3 do
  local case_id, score = ARGV[i], ARGV[i + 1]
  if not tonumber(score) then return redis.error_reply('requeue: score of ' .. case_id .. ' is not a number') end
  local stays_done = held_out(case_id, threshold) and redis.call('SISMEMBER', done, case_id) == 1
  requeue[i] = not stays_done and redis.call('ZSCORE', leased, case_id) == false
end

-- 2. Write.
local queued = 0
for i = 2, #ARGV, 3 do
  local case_id, score, blob = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if blob ~= '' then
    redis.call('SET', KEYS[8 + (i + 1) / 3], blob, 'NX')
    redis.call('SADD', cases, case_id)
  end
  if requeue[i] then
    redis.call('ZADD', queue, score, case_id)
    redis.call('SREM', done, case_id)
    redis.call('ZREM', retire, case_id)
    redis.call('HDEL', dead, case_id)
    redis.call('HDEL', rejected, case_id)
    redis.call('HDEL', attempts, case_id)
    queued = queued + 1
  end
end
return queued

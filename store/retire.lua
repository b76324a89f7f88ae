-- Retire finished cases from Redis (the archive keeps them): those that finished more than
-- the retention time ago, and the oldest beyond the retention count. A finished case is
-- done (trained, rejected or held out), dead, or a loss without features; each one leaves
-- every set and hash it is in together with its blob, so queued + leased + done + dead =
-- total still holds. The caller passes the oldest candidates; each is judged again here by
-- Redis TIME, and one that was requeued since (it is queued or leased) only leaves the index.
--
-- KEYS: 1 retire, 2 cases, 3 featureless, 4 done, 5 dead, 6 rejected, 7 attempts, 8 queue,
--       9 leased, 10 stats, 11.. one case key per candidate, in ARGV order
-- ARGV: 1 retention ms (0: no time bound), 2 most finished cases kept (0: no count bound),
--       then the candidate case ids
-- Returns the number of cases retired
local retire, cases, featureless, done, dead, rejected, attempts, queue, leased, stats =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local retention_ms, keep = tonumber(ARGV[1]), tonumber(ARGV[2])

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local over = keep > 0 and redis.call('ZCARD', retire) - keep or 0

-- 1. Judge every candidate before the first write.
local verdicts = {}
local retired = 0
for c = 3, #ARGV do
  local case_id = ARGV[c]
  local score = redis.call('ZSCORE', retire, case_id)
  local verdict = 'stays'
  if score then
    local old = retention_ms > 0 and tonumber(score) <= now_ms - retention_ms
    local beyond = over > 0 and redis.call('ZRANK', retire, case_id) < over
    if redis.call('ZSCORE', queue, case_id) or redis.call('ZSCORE', leased, case_id) then
      verdict = 'unindex'
    elseif old or beyond then
      verdict = 'retire'
      retired = retired + 1
    end
  end
  verdicts[c] = verdict
end
local total = (tonumber(redis.call('HGET', stats, 'cases_retired')) or 0) + retired

-- 2. Write.
for c = 3, #ARGV do
  local case_id = ARGV[c]
  if verdicts[c] ~= 'stays' then redis.call('ZREM', retire, case_id) end
  if verdicts[c] == 'retire' then
    redis.call('SREM', cases, case_id)
    redis.call('SREM', featureless, case_id)
    redis.call('SREM', done, case_id)
    redis.call('HDEL', dead, case_id)
    redis.call('HDEL', rejected, case_id)
    redis.call('HDEL', attempts, case_id)
    redis.call('DEL', KEYS[8 + c])
  end
end
if retired > 0 then redis.call('HSET', stats, 'cases_retired', string.format('%d', total)) end
return retired

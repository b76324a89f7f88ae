-- Add a batch of live outcomes to the windows of the versions that made the decisions, each
-- trade once: a trade_id already in `seen` (redelivered, claimed by two detectors, or
-- published twice) changes nothing. The detector runs this before it records the batch, so
-- a crash in between is redelivered and only finds its trades here already. Everything is
-- read and decided before the first write.
--
-- KEYS: 1 live:seen, 2 stats, 3 live:versions, 4.. one live window per version, in ARGV order
-- ARGV: 1 window size, 2 most trade ids kept in `seen`, 3 version count, then the versions,
--       then per outcome (3): trade_id, the version's position (1-based), value (the P&L in
--       percent of the margin, or 'hold')
-- Returns {outcomes scored, duplicates}
local seen, stats, versions = KEYS[1], KEYS[2], KEYS[3]
local window, seen_max, n_versions = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now_ms = redis_now_ms()

-- 1. Decide: which outcomes are new (not in `seen`, nor earlier in this batch).
local new, in_batch, pushed = {}, {}, {}
local scored, duplicates = 0, 0
for i = 4 + n_versions, #ARGV, 3 do
  local trade_id, at = ARGV[i], tonumber(ARGV[i + 1])
  if not at or at < 1 or at > n_versions then
    return redis.error_reply('score_live: outcome of ' .. trade_id .. ' names no version')
  end
  if in_batch[trade_id] or redis.call('ZSCORE', seen, trade_id) then
    duplicates = duplicates + 1
  else
    in_batch[trade_id] = true
    table.insert(new, i)
    pushed[at] = (pushed[at] or 0) + 1
    scored = scored + 1
  end
end
local counters = {}
for at, count in pairs(pushed) do
  local field = 'model:' .. ARGV[3 + at] .. ':scored'
  table.insert(counters, field)
  table.insert(counters, string.format('%d', (tonumber(redis.call('HGET', stats, field)) or 0) + count))
end
if duplicates > 0 then
  table.insert(counters, 'live_duplicates')
  table.insert(counters, string.format('%d',
    (tonumber(redis.call('HGET', stats, 'live_duplicates')) or 0) + duplicates))
end
local excess = redis.call('ZCARD', seen) + scored - seen_max

-- 2. Write.
for _, i in ipairs(new) do
  local at = tonumber(ARGV[i + 1])
  redis.call('ZADD', seen, now_ms, ARGV[i])
  redis.call('LPUSH', KEYS[3 + at], ARGV[i + 2])
end
for at, _ in pairs(pushed) do
  local version = ARGV[3 + at]
  redis.call('LTRIM', KEYS[3 + at], 0, window - 1)
  redis.call('ZADD', versions, version, version)
end
if #counters > 0 then redis.call('HSET', stats, unpack(counters)) end
if excess > 0 then redis.call('ZREMRANGEBYRANK', seen, 0, excess - 1) end
return {scored, duplicates}

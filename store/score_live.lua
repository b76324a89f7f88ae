-- Add a batch of live outcomes to the windows of the versions that made the decisions, each
-- trade once: a trade_id already in `seen` (redelivered, claimed by two detectors, or
-- published twice) changes nothing. The detector runs this before it records the batch, so
-- a crash in between is redelivered and only finds its trades here already.
--
-- KEYS: 1 live:seen, 2 stats, 3 live:versions, 4.. one live window per version, in ARGV order
-- ARGV: 1 window size, 2 most trade ids kept in `seen`, 3 version count, then the versions,
--       then per outcome (3): trade_id, the version's position (1-based), value (the P&L in
--       percent of the margin, or 'hold')
-- Returns {outcomes scored, duplicates}
local seen, stats, versions = KEYS[1], KEYS[2], KEYS[3]
local window, seen_max, n_versions = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now_ms = redis_now_ms()

local pushed = {}
local scored, duplicates = 0, 0
for i = 4 + n_versions, #ARGV, 3 do
  local trade_id, at, value = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  if redis.call('ZADD', seen, 'NX', now_ms, trade_id) == 1 then
    redis.call('LPUSH', KEYS[3 + at], value)
    pushed[at] = (pushed[at] or 0) + 1
    scored = scored + 1
  else
    duplicates = duplicates + 1
  end
end

for at, count in pairs(pushed) do
  local version = ARGV[3 + at]
  redis.call('LTRIM', KEYS[3 + at], 0, window - 1)
  redis.call('ZADD', versions, version, version)
  redis.call('HINCRBY', stats, 'model:' .. version .. ':scored', count)
end
if duplicates > 0 then redis.call('HINCRBY', stats, 'live_duplicates', duplicates) end

local excess = redis.call('ZCARD', seen) - seen_max
if excess > 0 then redis.call('ZREMRANGEBYRANK', seen, 0, excess - 1) end
return {scored, duplicates}

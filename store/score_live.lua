-- Add a batch of live outcomes to the windows of the versions that made the decisions, each
-- trade once: a trade_id already in `seen` (redelivered, claimed by two detectors, or
-- published twice) changes nothing. The detector runs this before it records the batch, so
-- a crash in between is redelivered and only finds its trades here already. Everything is
-- read and decided before the first write.
--
-- KEYS: 1 live:seen, 2 stats, 3 live:versions, 4.. one live window per version, in ARGV order
-- ARGV: 1 window size, 2 most trade ids kept in `seen`, 3 version count, then the versions,
--       then per outcome (4): trade_id, the version's position (1-based), value (the P&L in
--       percent of the margin, or 'hold'), and what the engine's own rule would have made on
--       the same decision ('' when the engine did not say)
-- Besides the window, each version's decisions with a known rule add up in `stats`, for the
-- serving step's comparison with the rule: model:<v>:rule_n, :rule_sum (the rule's P&L),
-- :rule_sum_d and :rule_sumsq_d (the version's P&L minus the rule's, and its square).
-- Returns {outcomes scored, duplicates}
local seen, stats, versions = KEYS[1], KEYS[2], KEYS[3]
local window, seen_max, n_versions = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now_ms = redis_now_ms()

-- 1. Decide: which outcomes are new (not in `seen`, nor earlier in this batch).
local new, in_batch, pushed = {}, {}, {}
local scored, duplicates = 0, 0
for i = 4 + n_versions, #ARGV, 4 do
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
local function pnl_of(text)
  return text == 'hold' and 0 or tonumber(text)
end
-- The sums against the rule, per version position: {n, rule, d, d squared}.
local against = {}
for _, i in ipairs(new) do
  local rule = ARGV[i + 3] ~= '' and tonumber(ARGV[i + 3]) or nil
  local own = pnl_of(ARGV[i + 2])
  if rule ~= nil and own ~= nil then
    local at = tonumber(ARGV[i + 1])
    local sums = against[at] or {0, 0, 0, 0}
    local d = own - rule
    against[at] = {sums[1] + 1, sums[2] + rule, sums[3] + d, sums[4] + d * d}
  end
end
local counters = {}
local RULE_FIELDS = {':rule_n', ':rule_sum', ':rule_sum_d', ':rule_sumsq_d'}
for at, sums in pairs(against) do
  local prefix = 'model:' .. ARGV[3 + at]
  local fields = {}
  for k, suffix in ipairs(RULE_FIELDS) do fields[k] = prefix .. suffix end
  local stored = redis.call('HMGET', stats, unpack(fields))
  for k, field in ipairs(fields) do
    table.insert(counters, field)
    table.insert(counters, string.format('%.17g', (tonumber(stored[k]) or 0) + sums[k]))
  end
end
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

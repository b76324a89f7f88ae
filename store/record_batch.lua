-- Record one detector batch atomically: new cases, dead letters, counters, events, and the
-- acknowledgement of every entry handled. A crash before this script leaves the entries
-- pending (they are redelivered); after it, everything is stored and acknowledged.
--
-- KEYS: 1 trades stream, 2 cases set, 3 featureless set, 4 queue, 5 events, 6 stats,
--       7 trades:dead, 8 rate bucket, 9 outcomes stream, 10 validation stream,
--       11.. one case key per case, in ARGV order
-- ARGV: 1 group, 2 events maxlen, 3 dead maxlen, 4 rate ttl s, 5 trades maxlen (0: keep all),
--       6 case count, 7 dead-letter count, 8 counter count, 9 ack count,
--       10 outcome count, 11 outcomes maxlen, 12 validation maxlen, then
--       per case (7): case_id, blob, queue score or "" (no features), version label,
--                     loss_pct, case_added event (msgpack array of field, value),
--                     kind ("loss", or "opportunity": a skip that missed a move)
--       per dead letter (2): fields (msgpack array), dead_lettered event (msgpack array)
--       per counter (2): stats field, increment
--       per outcome (2): msgpack blob, 1 when held out (to the validation stream) else 0
--       per ack (1): entry id
-- Returns {new cases, duplicate cases}
local trades, cases, featureless, queue, events, stats, dead, rate =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local group, events_maxlen, dead_maxlen, rate_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local trades_maxlen = tonumber(ARGV[5])
local n_cases, n_dead = tonumber(ARGV[6]), tonumber(ARGV[7])
local n_counters, n_acks = tonumber(ARGV[8]), tonumber(ARGV[9])
local n_outcomes, outcomes_maxlen, validation_maxlen = tonumber(ARGV[10]), ARGV[11], ARGV[12]

-- Counters add up in a Lua table and are written once per field at the end: a batch of
-- 500 cases makes a handful of HINCRBY calls, not thousands.
local counts = {}
local function count(field, by)
  counts[field] = (counts[field] or 0) + by
end

local loss_sums = {}
local added, duplicates = 0, 0
local i = 13
for c = 1, n_cases do
  local case_id, blob, score, version, loss_pct =
    ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local set = featureless
  if score ~= '' then set = cases end
  if redis.call('SADD', set, case_id) == 1 then
    redis.call('SET', KEYS[10 + c], blob)
    if score ~= '' then
      redis.call('ZADD', queue, score, case_id)
    else
      count('cases_without_features', 1)
    end
    count('cases_added', 1)
    if ARGV[i + 6] == 'opportunity' then
      count('skips', 1)
      count('opportunities', 1)
      count('model:' .. version .. ':skips', 1)
    else
      count('trades', 1)
      count('losses', 1)
      count('model:' .. version .. ':trades', 1)
      count('model:' .. version .. ':losses', 1)
      local sum_field = 'model:' .. version .. ':loss_pct_sum'
      loss_sums[sum_field] = (loss_sums[sum_field] or 0) + tonumber(loss_pct)
    end
    redis.call('XADD', events, 'MAXLEN', '~', events_maxlen, '*', unpack(cmsgpack.unpack(ARGV[i + 5])))
    added = added + 1
  else
    count('duplicates', 1)
    duplicates = duplicates + 1
  end
  i = i + 7
end

for _ = 1, n_dead do
  redis.call('XADD', dead, 'MAXLEN', '~', dead_maxlen, '*', unpack(cmsgpack.unpack(ARGV[i])))
  redis.call('XADD', events, 'MAXLEN', '~', events_maxlen, '*', unpack(cmsgpack.unpack(ARGV[i + 1])))
  i = i + 2
end
if n_dead > 0 then count('dead_lettered', n_dead) end

for _ = 1, n_counters do
  count(ARGV[i], tonumber(ARGV[i + 1]))
  i = i + 2
end

-- Every outcome (win, loss or skip with features) feeds learning: the replay store, or
-- the validation window when its trade is held out.
for _ = 1, n_outcomes do
  if ARGV[i + 1] == '1' then
    redis.call('XADD', KEYS[10], 'MAXLEN', '~', validation_maxlen, '*', 'o', ARGV[i])
  else
    redis.call('XADD', KEYS[9], 'MAXLEN', '~', outcomes_maxlen, '*', 'o', ARGV[i])
  end
  i = i + 2
end
if n_outcomes > 0 then count('outcomes', n_outcomes) end

for field, by in pairs(counts) do
  redis.call('HINCRBY', stats, field, by)
  redis.call('HINCRBY', rate, field, by)
end
for field, sum in pairs(loss_sums) do
  redis.call('HINCRBYFLOAT', stats, field, sum)
end

if n_acks > 0 then
  redis.call('XACK', trades, group, unpack(ARGV, i, i + n_acks - 1))
end
redis.call('EXPIRE', rate, rate_ttl)

-- Keep the trades stream near trades_maxlen, oldest entries first, but never trim an entry
-- that some group has not acknowledged: below its oldest pending entry and its last
-- delivered one, every entry is acknowledged.
local function before(a, b)
  local a_ms, a_seq = string.match(a, '(%d+)-(%d+)')
  local b_ms, b_seq = string.match(b, '(%d+)-(%d+)')
  a_ms, b_ms = tonumber(a_ms), tonumber(b_ms)
  return a_ms < b_ms or (a_ms == b_ms and tonumber(a_seq) < tonumber(b_seq))
end
local excess = trades_maxlen > 0 and redis.call('XLEN', trades) - trades_maxlen or 0
if excess > 0 then
  -- The groups' floor first: when a lagging group holds the oldest entry, there is nothing
  -- to trim, and nothing more is read.
  local floor
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', trades)) do
    local name, delivered
    for f = 1, #info, 2 do
      if info[f] == 'name' then name = info[f + 1] end
      if info[f] == 'last-delivered-id' then delivered = info[f + 1] end
    end
    if floor == nil or before(delivered, floor) then floor = delivered end
    local pending = redis.call('XPENDING', trades, name)
    if pending[1] > 0 and before(pending[2], floor) then floor = pending[2] end
  end
  local first = redis.call('XRANGE', trades, '-', '+', 'COUNT', 1)[1][1]
  if floor == nil or before(first, floor) then
    -- At most a step per call, so one script never reads a long backlog; a step of at
    -- least twice the batch still catches up. MINID keeps the id it is given: cut at the
    -- first entry that stays.
    local step = math.min(excess, math.max(1000, 2 * n_acks))
    local oldest = redis.call('XRANGE', trades, '-', '+', 'COUNT', step + 1)
    local cut = oldest[#oldest][1]
    if floor ~= nil and before(floor, cut) then cut = floor end
    redis.call('XTRIM', trades, 'MINID', cut)
  end
end
return {added, duplicates}

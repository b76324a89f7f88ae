-- Record one detector batch atomically: new cases, wins, skips, dead letters, counters,
-- events, the outcomes learning replays (the replay store, or the validation window when
-- the trade is held out), the idempotency record, and the acknowledgement of every entry
-- handled. A crash before this
-- script leaves the entries pending (they are redelivered); after it, everything is stored
-- and acknowledged.
--
-- Redis does not roll a script back when a command fails half-way, so this one reads,
-- checks and computes everything first and writes only once nothing can fail: the writes
-- are SET, SADD, ZADD, HSET of values computed here, XADD of fields packed by the caller,
-- XACK, XTRIM and ZREMRANGEBYRANK, none of which can refuse what was checked.
--
-- Exactly once: an entry that is no longer pending was recorded by the script that
-- acknowledged it (another detector claimed it while this one was slow) and has no effect
-- here; a trade whose key is in the idempotency record (`seen`: trade key -> first seen,
-- ms), or whose case is still stored, is a duplicate and only counted as one.
--
-- KEYS: 1 trades stream, 2 cases set, 3 featureless set, 4 queue, 5 events, 6 stats,
--       7 trades:dead, 8 rate bucket, 9 seen, 10 retire, 11 outcomes stream,
--       12 validation stream, 13.. one case key per entry of kind loss or opportunity,
--       in ARGV order
-- ARGV: 1 group, 2 events maxlen, 3 dead maxlen, 4 rate ttl s, 5 trades maxlen (0: keep all),
--       6 seen window ms, 7 seen max ids, 8 outcomes maxlen, 9 validation maxlen,
--       10 entry count, then per entry (11): entry id ('' for none), kind (loss |
--       opportunity | win | skip | dead), trade key, case id, version label, queue score
--       ('' for a case without features), loss_pct, payload (case blob, or the dead letter
--       as a msgpack array of field, value), event (msgpack array of field, value; '' for
--       none), outcome (msgpack; '' for none), '1' when the trade is held out
-- Returns {cases added, duplicates, wins, dead letters, entries another detector recorded}
local trades, cases, featureless, queue, events, stats, dead, rate, seen, retire =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local outcomes, validation = KEYS[11], KEYS[12]
local group, events_maxlen, dead_maxlen, rate_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local trades_maxlen, seen_window_ms, seen_max = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local outcomes_maxlen, validation_maxlen = ARGV[8], ARGV[9]
local n_entries = tonumber(ARGV[10])
local PER_ENTRY = 11
local FIRST = 11
local FIRST_CASE_KEY = 13
local DOUBLE_MAX = 1.7976931348623157e308

local function finite(x)
  return x ~= nil and x == x and x > -math.huge and x < math.huge
end

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

-- The fields an XADD will get, decoded before any write: a list of pairs unpack() can take
-- (it takes about 8,000 values), or nil.
local function pairs_of(packed)
  local ok, fields = pcall(cmsgpack.unpack, packed)
  if ok and type(fields) == 'table' and #fields >= 2 and #fields % 2 == 0 and #fields <= 7000 then
    return fields
  end
  return nil
end
local function malformed(e, what)
  return redis.error_reply('record_batch: entry ' .. e .. ' has a malformed ' .. what)
end

-- 1. Read and decide: what each entry becomes, and every counter's increment.
local counts, loss_sums = {}, {}
local function count(field, by)
  counts[field] = (counts[field] or 0) + by
end
local fates, in_batch, acks, payloads, announcements = {}, {}, {}, {}, {}
local added, duplicates, wins, dead_letters, recorded_elsewhere = 0, 0, 0, 0, 0
local new_seen = 0
local trainable = {}
for e = 1, n_entries do
  local at = FIRST + (e - 1) * PER_ENTRY
  local entry_id, kind, key, case_id, version = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4]
  local loss_pct = tonumber(ARGV[at + 6])
  local is_case = kind == 'loss' or kind == 'opportunity'
  if not (is_case or kind == 'win' or kind == 'skip' or kind == 'dead') then
    return redis.error_reply('record_batch: entry ' .. e .. ' has an unknown kind')
  end
  trainable[e] = is_case and ARGV[at + 5] ~= ''
  if is_case and (not finite(loss_pct) or (trainable[e] and not finite(tonumber(ARGV[at + 5])))) then
    return redis.error_reply('record_batch: entry ' .. e .. ' has a loss or score that is not a finite number')
  end
  if kind == 'dead' then
    payloads[e] = pairs_of(ARGV[at + 7])
    if not payloads[e] then return malformed(e, 'dead letter') end
  end
  if ARGV[at + 8] ~= '' then
    announcements[e] = pairs_of(ARGV[at + 8])
    if not announcements[e] then return malformed(e, 'event') end
  end
  if entry_id ~= '' then table.insert(acks, entry_id) end
  local fate = kind
  if entry_id ~= '' and #redis.call('XPENDING', trades, group, entry_id, entry_id, 1) == 0 then
    fate = 'recorded'
    recorded_elsewhere = recorded_elsewhere + 1
  elseif kind ~= 'dead' and (in_batch[key] or redis.call('ZSCORE', seen, key)
      or (is_case and (redis.call('SISMEMBER', cases, case_id) == 1
                       or redis.call('SISMEMBER', featureless, case_id) == 1))) then
    fate = 'duplicate'
    duplicates = duplicates + 1
    count('duplicates', 1)
  elseif kind == 'dead' then
    dead_letters = dead_letters + 1
    count('dead_lettered', 1)
  else
    in_batch[key] = true
    new_seen = new_seen + 1
    if kind == 'win' or kind == 'loss' then
      count('trades', 1)
      count('model:' .. version .. ':trades', 1)
    else  -- a skip, or a skip that missed a move (an opportunity)
      count('skips', 1)
      count('model:' .. version .. ':skips', 1)
    end
    if kind == 'win' then
      wins = wins + 1
      count('wins', 1)
    elseif is_case then
      added = added + 1
      count('cases_added', 1)
      if not trainable[e] then count('cases_without_features', 1) end
      if kind == 'opportunity' then
        count('opportunities', 1)
      else
        count('losses', 1)
        count('model:' .. version .. ':losses', 1)
        local sum_field = 'model:' .. version .. ':loss_pct_sum'
        loss_sums[sum_field] = (loss_sums[sum_field] or 0) + loss_pct
      end
    end
    if ARGV[at + 9] ~= '' then count('outcomes', 1) end
  end
  fates[e] = fate
end

-- The new counter values. Computed here and written with HSET, so no increment can fail
-- half-way (HINCRBYFLOAT refuses a sum that overflows; a float sum saturates instead).
-- Fields go to HMGET and HSET a chunk at a time: unpack() takes about 8,000 values, and a
-- batch of trades naming thousands of model versions has three fields for each.
local CHUNK = 1000
local function new_values(hash, increments, as_float)
  local fields, values = {}, {}
  for field, by in pairs(increments) do
    table.insert(fields, field)
    table.insert(values, by)
  end
  local out = {}
  for first = 1, #fields, CHUNK do
    local last = math.min(first + CHUNK - 1, #fields)
    local current = redis.call('HMGET', hash, unpack(fields, first, last))
    local chunk = {}
    for f = first, last do
      local value = (tonumber(current[f - first + 1]) or 0) + values[f]
      local text
      if as_float then
        if not finite(value) then value = value > 0 and DOUBLE_MAX or -DOUBLE_MAX end
        text = string.format('%.17g', value)
      else
        text = string.format('%d', value)
      end
      table.insert(chunk, fields[f])
      table.insert(chunk, text)
    end
    table.insert(out, chunk)
  end
  return out
end
local stats_values = new_values(stats, counts, false)
local sum_values = new_values(stats, loss_sums, true)
local rate_values = new_values(rate, counts, false)

-- The idempotency record's trim: ids older than the window, or beyond the most kept, oldest
-- first, at most a step per call so one script never does a long backlog's work.
local step = math.max(1000, 2 * n_entries)
local expired = redis.call('ZCOUNT', seen, '-inf', now_ms - seen_window_ms)
local over = redis.call('ZCARD', seen) + new_seen - seen_max
local seen_drop = math.min(step, math.max(expired, over, 0))

-- Keep the trades stream near trades_maxlen, oldest entries first, but never trim an entry
-- that some group has not acknowledged: below its oldest pending entry and its last
-- delivered one, every entry is acknowledged. Read before this batch's XACK, so the floor
-- is at most one batch lower than it could be.
local function before(a, b)
  local a_ms, a_seq = string.match(a, '(%d+)-(%d+)')
  local b_ms, b_seq = string.match(b, '(%d+)-(%d+)')
  a_ms, b_ms = tonumber(a_ms), tonumber(b_ms)
  return a_ms < b_ms or (a_ms == b_ms and tonumber(a_seq) < tonumber(b_seq))
end
local cut
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
    -- MINID keeps the id it is given: cut at the first entry that stays.
    local oldest = redis.call('XRANGE', trades, '-', '+', 'COUNT', math.min(excess, step) + 1)
    cut = oldest[#oldest][1]
    if floor ~= nil and before(floor, cut) then cut = floor end
  end
end

-- 2. Write.
local c = 0
for e = 1, n_entries do
  local at = FIRST + (e - 1) * PER_ENTRY
  local kind, fate = ARGV[at + 1], fates[e]
  local new_case = fate == 'loss' or fate == 'opportunity'
  if kind == 'loss' or kind == 'opportunity' then c = c + 1 end
  if new_case then
    local case_id = ARGV[at + 3]
    redis.call('SET', KEYS[FIRST_CASE_KEY - 1 + c], ARGV[at + 7])
    if trainable[e] then
      redis.call('SADD', cases, case_id)
      redis.call('ZADD', queue, ARGV[at + 5], case_id)
    else
      -- Finished at birth: it leaves Redis with the other finished cases (retire.lua).
      redis.call('SADD', featureless, case_id)
      redis.call('ZADD', retire, now_ms, case_id)
    end
  elseif fate == 'dead' then
    redis.call('XADD', dead, 'MAXLEN', '~', dead_maxlen, '*', unpack(payloads[e]))
  end
  if new_case or fate == 'win' or fate == 'skip' then
    redis.call('ZADD', seen, now_ms, ARGV[at + 2])
    -- Every outcome (win, loss or skip with features) feeds learning: the replay store,
    -- or the validation window when its trade is held out.
    if ARGV[at + 9] ~= '' then
      if ARGV[at + 10] == '1' then
        redis.call('XADD', validation, 'MAXLEN', '~', validation_maxlen, '*', 'o', ARGV[at + 9])
      else
        redis.call('XADD', outcomes, 'MAXLEN', '~', outcomes_maxlen, '*', 'o', ARGV[at + 9])
      end
    end
  end
  if (new_case or fate == 'dead') and announcements[e] then
    redis.call('XADD', events, 'MAXLEN', '~', events_maxlen, '*', unpack(announcements[e]))
  end
end
for _, chunk in ipairs(stats_values) do redis.call('HSET', stats, unpack(chunk)) end
for _, chunk in ipairs(sum_values) do redis.call('HSET', stats, unpack(chunk)) end
for _, chunk in ipairs(rate_values) do redis.call('HSET', rate, unpack(chunk)) end
if #rate_values > 0 then redis.call('EXPIRE', rate, rate_ttl) end
if #acks > 0 then redis.call('XACK', trades, group, unpack(acks)) end
if seen_drop > 0 then redis.call('ZREMRANGEBYRANK', seen, 0, seen_drop - 1) end
if cut then redis.call('XTRIM', trades, 'MINID', cut) end
return {added, duplicates, wins, dead_letters, recorded_elsewhere}

-- The serving decision, one step of it: which version is in service (answers signal
-- requests), which is the canary (answers a share of them on trial), moved by live results.
-- Every change happens here, in one script, and moves `epoch` on: any process may run it at
-- any moment (a detector after each batch, a trainer before each session and after
-- publishing, an inference worker when it reads an announcement), and none can decide
-- against another. The caller reads the state first and names the keys it needs; when
-- `epoch` or `latest` moved since, the step is refused as 'stale' (before any write) and
-- the caller reads again.
--
-- In order, at most one change a step:
--   a version an inference worker refused is marked, and retired as canary or rolled back
--     from service;
--   nothing in service yet: the latest version serves;
--   live decisions off (NEGCASE_AUTO_ROLLBACK=0): the latest version serves at once;
--   the version in service, every min outcomes whose engine said what its own rule would
--     have done (TradeClosed.rule_side): deferred to the rule when its z against the rule,
--     paired on those decisions, is below -canary z; it then answers with no opinion until
--     another version serves;
--   a canary with min outcomes, and a version in service with as many: retired when its
--     z (mean P&L per decision against the version in service) is below -canary z,
--     promoted otherwise;
--   no canary, and a newer loadable latest: it starts as the canary (or serves at once when
--     the share is 0);
--   a promoted version in service, every min outcomes it scores: rolled back to the newest
--     loadable version in the history when its z against that version is below -rollback z.
-- Retiring and rolling back set `latest` back too, so trainers build on what serves.
--
-- KEYS: 1 serving, 2 serving:history, 3 serving:refused, 4 latest, 5 checkpoints stream,
--       6 events, 7 stats, 8 live:versions, then per involved version (2): its live window,
--       its checkpoint hash; then the live windows to drop
-- ARGV: 1 expected epoch, 2 expected latest ('' for none), 3 canary share, 4 live decisions
--       on (1|0), 5 min outcomes, 6 canary z, 7 rollback z, 8 stream maxlen, 9 events maxlen,
--       10 a version a worker refused ('' for none), 11 why, 12 involved count, then the
--       involved versions (service, canary, latest, history: every one the step may read),
--       then one version per dropped window, in KEYS order
-- Returns {'stale'} | {'unchanged'} | {change, version, reason}
-- (`serving` also holds `defers`, the version in service that defers to the engine's rule,
-- and `rule_checked`, its decisions with a known rule when it was last compared with it.)
local serving, history, refused, latest_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local stream, events, stats, live_versions = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local share, min_outcomes = ARGV[3], tonumber(ARGV[5])
local canary_z, rollback_z = tonumber(ARGV[6]), tonumber(ARGV[7])
local HISTORY_KEPT = 20

local state = {}
local flat = redis.call('HGETALL', serving)
for i = 1, #flat, 2 do state[flat[i]] = flat[i + 1] end
local epoch = tonumber(state.epoch) or 0
local latest = redis.call('GET', latest_key) or ''
if tostring(epoch) ~= ARGV[1] or latest ~= ARGV[2] then return {'stale'} end
local service, canary = state.service or '', state.canary or ''

local n_involved = tonumber(ARGV[12])
local involved = {}
for j = 1, n_involved do
  involved[ARGV[12 + j]] = {window = KEYS[7 + 2 * j], checkpoint = KEYS[8 + 2 * j]}
end
local earlier = redis.call('LRANGE', history, 0, -1)
for _, version in ipairs({service, canary, latest, unpack(earlier)}) do
  if version ~= '' and involved[version] == nil then return {'stale'} end
end

-- Windows of versions nobody needs any more (the caller chose them from this epoch).
local dropped = 0
for k = 9 + 2 * n_involved, #KEYS do
  redis.call('DEL', KEYS[k])
  redis.call('ZREM', live_versions, ARGV[13 + n_involved + dropped])
  dropped = dropped + 1
end

local now_ms = redis_now_ms()

local function joined(first, second)
  local all = {unpack(first)}
  for _, value in ipairs(second or {}) do table.insert(all, value) end
  return all
end

local function number(x)
  return string.format('%.6g', x)
end

local function loadable(version)
  local record = involved[version]
  return record ~= nil and redis.call('HEXISTS', record.checkpoint, 'weights') == 1
    and redis.call('HEXISTS', refused, version) == 0
end

local function scored(version)
  return tonumber(redis.call('HGET', stats, 'model:' .. version .. ':scored') or '0')
end

-- Its decisions with a known rule so far: a version put in service is compared with the
-- rule once it has made the minimum more of them, not at once on its whole past.
local function rule_decisions(version)
  return redis.call('HGET', stats, 'model:' .. version .. ':rule_n') or '0'
end

local function outcomes(version)
  return redis.call('LLEN', involved[version].window)
end

-- The figures an event carries: the candidate's, the baseline's, and the test.
local function figures(candidate, baseline_version, baseline, z, threshold)
  return {
    'n', candidate.n, 'mean_pnl_pct', number(candidate.mean),
    'loss_rate', number(candidate.loss_rate),
    'baseline_version', baseline_version, 'baseline_n', baseline.n,
    'baseline_mean_pnl_pct', number(baseline.mean),
    'baseline_loss_rate', number(baseline.loss_rate),
    'z', number(z), 'z_threshold', number(threshold),
  }
end

-- The version against the engine's rule on its decisions that say what the rule would
-- have done (score_live.lua sums them): a paired z, since both acted on the same decisions.
local function versus_rule(version)
  local prefix = 'model:' .. version
  local sums = redis.call('HMGET', stats, prefix .. ':rule_n', prefix .. ':rule_sum',
    prefix .. ':rule_sum_d', prefix .. ':rule_sumsq_d')
  local n = tonumber(sums[1]) or 0
  if n < 2 then return nil end
  local rule, d, squares = tonumber(sums[2]), tonumber(sums[3]), tonumber(sums[4])
  local mean = d / n
  local error = math.sqrt(math.max(0, (squares - n * mean * mean) / (n - 1)) / n)
  local z = 0
  if error > 1e-12 then z = mean / error
  elseif mean < 0 then z = -math.huge
  elseif mean > 0 then z = math.huge end
  return {n = n, mean = (rule + d) / n, rule_mean = rule / n, z = z}
end

local function move(fields)
  redis.call('HSET', serving, 'epoch', epoch + 1, unpack(fields))
end

local function announce(kind, version, previous)
  redis.call('XADD', stream, 'MAXLEN', '~', ARGV[8], '*', 'kind', kind, 'version', version,
    'previous_version', previous, 'epoch', epoch + 1, 'at_ms', now_ms)
end

local function event(kind, fields)
  redis.call('XADD', events, 'MAXLEN', '~', ARGV[9], '*', 'type', kind, 'at_ms', now_ms,
    unpack(fields))
end

local function promote(version, reason, with)
  if service ~= '' then
    redis.call('LPUSH', history, service)
    redis.call('LTRIM', history, 0, HISTORY_KEPT - 1)
  end
  -- Watched for a rollback only when there is a predecessor to compare with.
  move({'service', version, 'canary', '', 'service_since_ms', now_ms,
    'checked', scored(version), 'watch', service ~= '' and '1' or '0',
    'defers', '', 'rule_checked', rule_decisions(version)})
  announce('promoted', version, service)
  event('promoted', joined({'version', version, 'previous_version', service, 'reason', reason},
    with))
  return {'promoted', version, reason}
end

local function start_canary(version)
  move({'canary', version, 'canary_share', share, 'canary_since_ms', now_ms,
    'canary_min_outcomes', min_outcomes})
  announce('canary_started', version, service)
  event('canary_started', {'version', version, 'service_version', service, 'share', share,
    'min_outcomes', min_outcomes})
  return {'canary_started', version, ''}
end

local function retire(version, reason, with)
  move({'canary', ''})
  redis.call('SET', latest_key, service)
  announce('retired', version, service)
  event('retired', joined({'version', version, 'service_version', service, 'reason', reason},
    with))
  return {'retired', version, reason}
end

-- The version a rollback goes back to: the newest earlier one that can still be loaded.
local function rollback_target()
  for _, version in ipairs(earlier) do
    if loadable(version) then return version end
  end
  return nil
end

local function rollback(target, reason, with)
  for i, version in ipairs(earlier) do
    if version == target then
      redis.call('LTRIM', history, i, -1)
      break
    end
  end
  -- A version restored by a rollback is the one that just did better: not watched again.
  move({'service', target, 'canary', '', 'service_since_ms', now_ms,
    'checked', scored(target), 'watch', '0', 'defers', '', 'rule_checked', rule_decisions(target)})
  redis.call('SET', latest_key, target)
  local sha256 = redis.call('HGET', involved[target].checkpoint, 'sha256') or ''
  announce('rollback', target, service)
  event('rollback', joined({'version', target, 'previous_version', service, 'sha256', sha256,
    'reason', reason}, with))
  return {'rollback', target, reason}
end

-- The version in service hands every decision back to the engine's own rule.
local function defer(version, rule)
  local reason = "worse than the engine's own rule on the same decisions"
  move({'defers', version, 'rule_checked', rule.n})
  announce('deferred', version, version)
  event('deferred', {'version', version, 'reason', reason, 'n', rule.n,
    'mean_pnl_pct', number(rule.mean), 'rule_mean_pnl_pct', number(rule.rule_mean),
    'z', number(rule.z), 'z_threshold', number(-canary_z)})
  return {'deferred', version, reason}
end

-- 1. A version a worker refused for a fault of its own checkpoint.
local refused_version = ARGV[10]
if refused_version ~= '' then
  redis.call('HSET', refused, refused_version, ARGV[11])
  local why = 'refused by an inference worker: ' .. ARGV[11]
  if refused_version == canary then return retire(canary, why) end
  if refused_version == service then
    local target = rollback_target()
    if target then return rollback(target, why) end
  end
end

-- 2. Nothing in service yet.
if service == '' then
  if latest == '' or not loadable(latest) then return {'unchanged'} end
  return promote(latest, 'nothing was in service: no version to compare it with')
end

-- 3. Live decisions off.
if ARGV[4] ~= '1' then
  if latest ~= service and loadable(latest) then
    return promote(latest, 'live decisions are off (NEGCASE_AUTO_ROLLBACK=0)')
  end
  if canary ~= '' then return retire(canary, 'live decisions are off (NEGCASE_AUTO_ROLLBACK=0)') end
  return {'unchanged'}
end

-- 4. The version in service against the engine's own rule, every min outcomes with a known
--    rule. Deferring costs nothing where the version is no better than the rule, so the
--    canary's threshold, not the stricter rollback's.
-- (A version an operator put in service, rule_checked 'operator', is not compared.)
if state.defers ~= service and state.rule_checked ~= 'operator' then
  local rule = versus_rule(service)
  if rule and rule.n - (tonumber(state.rule_checked) or 0) >= min_outcomes then
    redis.call('HSET', serving, 'rule_checked', rule.n)
    if rule.z < -canary_z then return defer(service, rule) end
  end
end

-- 5. A canary on trial.
if canary ~= '' then
  if not loadable(canary) then
    return retire(canary, 'it can no longer be loaded (trimmed from Redis, or refused)')
  end
  if outcomes(canary) < min_outcomes or outcomes(service) < min_outcomes then
    return {'unchanged'}
  end
  local c, s = window_stats(involved[canary].window), window_stats(involved[service].window)
  local z = z_score(c, s)
  local with = figures(c, service, s, z, -canary_z)
  if z < -canary_z then return retire(canary, 'worse than v' .. service .. ' in service', with) end
  return promote(canary, 'not worse than v' .. service .. ' in service', with)
end

-- 6. A newer version to try.
if latest ~= '' and tonumber(latest) > tonumber(service) and loadable(latest) then
  if tonumber(share) <= 0 then return promote(latest, 'no canary (NEGCASE_CANARY_SHARE=0)') end
  return start_canary(latest)
end

-- 7. The version in service against the one before it, every min outcomes it scores.
if state.watch ~= '1' then return {'unchanged'} end
local now_scored = scored(service)
if now_scored - (tonumber(state.checked) or 0) < min_outcomes then return {'unchanged'} end
local target = rollback_target()
if target == nil or outcomes(service) < min_outcomes or outcomes(target) < min_outcomes then
  return {'unchanged'}
end
redis.call('HSET', serving, 'checked', now_scored)
local s, p = window_stats(involved[service].window), window_stats(involved[target].window)
local z = z_score(s, p)
if z < -rollback_z then
  return rollback(target, 'worse than v' .. target .. ' before it', figures(s, target, p, z, -rollback_z))
end
return {'unchanged'}

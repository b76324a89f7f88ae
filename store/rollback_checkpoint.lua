-- An operator's rollback: put a stored version in service, cancel any canary, point `latest`
-- back at it (trainers build on it) and announce it. When the version is no longer in Redis
-- (trimmed) the caller passes it from the archive and it is stored again first.
-- Everything is read and checked before the first write.
--
-- KEYS: 1 latest, 2 the checkpoint hash, 3 versions, 4 checkpoints stream, 5 events,
--       6 serving, 7 serving:history
-- ARGV: 1 version, 2 its parent ('' for none), 3 stream maxlen, 4 events maxlen,
--       5 weights ('' when it is expected in Redis), 6 sha256, 7 meta JSON
-- Returns {'rolled_back', previous latest or ''} | {'missing', ''}
local latest, checkpoint, versions, stream, events = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local serving, history = KEYS[6], KEYS[7]
local version, parent = ARGV[1], ARGV[2]

local restore = redis.call('EXISTS', checkpoint) == 0
if restore and ARGV[5] == '' then return {'missing', ''} end
local sha256 = restore and ARGV[6] or redis.call('HGET', checkpoint, 'sha256')
if not sha256 then return {'missing', ''} end
local now_ms = redis_now_ms()
local previous_latest = redis.call('GET', latest) or ''
-- What traders were served before: the version in service, or latest before any was.
local previous = redis.call('HGET', serving, 'service') or previous_latest
local epoch = (tonumber(redis.call('HGET', serving, 'epoch')) or 0) + 1

if restore then
  redis.call('HSET', checkpoint, 'weights', ARGV[5], 'sha256', ARGV[6], 'meta', ARGV[7])
  redis.call('ZADD', versions, version, version)
end
-- A person chose it: it is not watched for an automatic rollback nor compared with the
-- engine's rule (serving_step.lua), and leaves the history.
redis.call('HSET', serving, 'service', version, 'canary', '', 'service_since_ms', now_ms,
  'watch', '0', 'defers', '', 'rule_checked', 'operator', 'epoch', string.format('%d', epoch))
redis.call('LREM', history, 0, version)
redis.call('SET', latest, version)
local announcement = {'kind', 'rollback', 'version', version, 'sha256', sha256, 'at_ms', now_ms,
  'previous_version', previous, 'epoch', epoch}
if parent ~= '' then
  table.insert(announcement, 'parent_version')
  table.insert(announcement, parent)
end
redis.call('XADD', stream, 'MAXLEN', '~', ARGV[3], '*', unpack(announcement))
redis.call('XADD', events, 'MAXLEN', '~', ARGV[4], '*', 'type', 'rollback', 'at_ms', now_ms,
  'version', version, 'previous_version', previous, 'sha256', sha256, 'reason', 'operator')
return {'rolled_back', previous_latest}

-- Shared by the publish scripts (store/scripts.py puts it in front of each): their common
-- ARGV 1-9, the checks before anything is written, how a checked checkpoint is stored, made
-- latest and announced, and how old versions are dropped, the same with one partition or
-- several.

-- What ARGV 2-9 carry (store/checkpoints.py _checkpoint_args; ARGV 1 is the expected latest).
local function checkpoint_args()
  return {version = ARGV[2], parent = ARGV[3], weights = ARGV[4], sha256 = ARGV[5],
    meta = ARGV[6], stream_maxlen = ARGV[7], events_maxlen = ARGV[8], trainer = ARGV[9]}
end

-- Store version `version` (its hash at `checkpoint`), point `latest` at it, keep the version
-- counter at or above it, and announce it on the checkpoints stream and the events stream.
-- k: latest, checkpoint, versions, stream, events, counter; c: version, parent ('' for
-- none), weights, sha256, meta, stream maxlen, events maxlen, trainer.
local function store_checkpoint(k, c, now_ms)
  -- A failover can lose the INCR that handed out `version` while this publish survives:
  -- the counter never stays below a published version, so no number is handed out twice.
  local raise_counter = (tonumber(redis.call('GET', k.counter)) or 0) < tonumber(c.version)
  redis.call('HSET', k.checkpoint, 'weights', c.weights, 'sha256', c.sha256, 'meta', c.meta)
  redis.call('ZADD', k.versions, c.version, c.version)
  redis.call('SET', k.latest, c.version)
  if raise_counter then redis.call('SET', k.counter, c.version) end
  local announcement = {'kind', 'published', 'version', c.version, 'sha256', c.sha256,
    'at_ms', now_ms}
  if c.parent ~= '' then
    table.insert(announcement, 'parent_version')
    table.insert(announcement, c.parent)
  end
  redis.call('XADD', k.stream, 'MAXLEN', '~', c.stream_maxlen, '*', unpack(announcement))
  redis.call('XADD', k.events, 'MAXLEN', '~', c.events_maxlen, '*', 'type',
    'checkpoint_published', 'at_ms', now_ms, 'version', c.version, 'parent_version', c.parent,
    'sha256', c.sha256, 'trainer', c.trainer)
end

-- Before a publish writes anything: the reply it gets without storing, or nil. A retry of
-- this very publish that went through already (its reply was lost, perhaps with a failing
-- primary's connection) is done, not redone; otherwise `latest` must still be `expected`.
-- k: latest, checkpoint; c: version, sha256.
local function refusal_before_storing(k, c, expected)
  local current = redis.call('GET', k.latest) or ''
  if current == c.version and redis.call('HGET', k.checkpoint, 'sha256') == c.sha256 then
    return {'published', c.version}
  end
  if current ~= expected then return {'conflict', current} end
  return nil
end

-- Drop the checkpoint hashes KEYS[first_key..] (older than the last K) and their versions,
-- ARGV[first_arg..] in the same order, from the versions index.
local function drop_stale(versions, first_key, first_arg)
  local i = first_arg
  for key = first_key, #KEYS do
    redis.call('DEL', KEYS[key])
    redis.call('ZREM', versions, ARGV[i])
    i = i + 1
  end
end

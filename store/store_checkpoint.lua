-- Shared by the publish scripts (store/scripts.py puts it in front of each): how a checked
-- checkpoint is stored, made latest and announced, the same with one partition or several.

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

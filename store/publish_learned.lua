-- Publish a checkpoint when the namespace has more than one partition: the cases it learned
-- from lease in their partition's slot, which no script here can reach, so instead of
-- finishing them this script records them in `learned` (case id -> ms), the publish step's
-- idempotency record in the lineage's slot. A case already there was published by an earlier
-- checkpoint (its trainer died between that publish and its ack): refused, so no case's
-- update is ever published twice. The trainer checked its leases just before, and acks its
-- cases in their partition just after; a case left leased by a crash in between is finished
-- as learned by the reaper (or a claim that meets it queued; store/partitions.py). Otherwise as
-- publish_checkpoint.lua: compare-and-set `latest`, store, announce, trim. Everything is
-- read and checked before the first write.
--
-- KEYS: 1 latest, 2 the new checkpoint hash, 3 versions, 4 checkpoints stream, 5 events,
--       6 version counter, 7 learned, 8.. the checkpoint hashes to drop (older than the last K)
-- ARGV: 1 expected latest ('' for none), 2 version, 3 parent ('' for none), 4 weights,
--       5 sha256, 6 meta JSON, 7 stream maxlen, 8 events maxlen, 9 trainer,
--       10 learned window ms, 11 case count, then the case ids, then one version per dropped
--       checkpoint hash, in KEYS order
-- Returns {'published', version} | {'conflict', current latest or ''} | {'learned', case_id}
local lineage = {latest = KEYS[1], checkpoint = KEYS[2], versions = KEYS[3], stream = KEYS[4],
  events = KEYS[5], counter = KEYS[6]}
local learned = KEYS[7]
local published = checkpoint_args()
local window_ms, n_cases = tonumber(ARGV[10]), tonumber(ARGV[11])
local FIRST_CASE, FIRST_STALE_KEY = 12, 8

local refused = refusal_before_storing(lineage, published, ARGV[1])
if refused then return refused end
for i = FIRST_CASE, FIRST_CASE + n_cases - 1 do
  if redis.call('ZSCORE', learned, ARGV[i]) then return {'learned', ARGV[i]} end
end

local now_ms = redis_now_ms()
store_checkpoint(lineage, published, now_ms)
for i = FIRST_CASE, FIRST_CASE + n_cases - 1 do
  redis.call('ZADD', learned, now_ms, ARGV[i])
end
-- The record outlives any lease and every redelivery by far: the dedup window.
redis.call('ZREMRANGEBYSCORE', learned, '-inf', now_ms - window_ms)

drop_stale(lineage.versions, FIRST_STALE_KEY, FIRST_CASE + n_cases)
return {'published', published.version}

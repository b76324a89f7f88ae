-- Publish a checkpoint and finish the cases it learned from, in one step: compare-and-set
-- `latest` from the version the trainer built on to the new one, store the blob, announce
-- it, trim old versions, and move every leased case to done with its updated blob. So a
-- crash can never leave an update published with its cases still leased (they would be
-- trained and published twice), nor cases done without their update.
-- Refused when latest moved (the trainer rebases and tries again) or when the trainer no
-- longer holds a live lease on every case it trained (fencing: it was paused or too slow).
-- Everything is read and checked before the first write.
--
-- KEYS: 1 latest, 2 the new checkpoint hash, 3 versions, 4 checkpoints stream, 5 events,
--       6 leased, 7 leases, 8 version counter, 9 done, 10 attempts, 11 rejected, 12 retire,
--       13.. one case key per lease, then the checkpoint hashes to drop (older than the
--       last K)
-- ARGV: 1 expected latest ('' for none), 2 version, 3 parent ('' for none), 4 weights,
--       5 sha256, 6 meta JSON, 7 stream maxlen, 8 events maxlen, 9 trainer,
--       10 lease count, then per lease (3): case_id, fencing token, updated blob ('' keeps it),
--       then one version per dropped checkpoint hash, in KEYS order
-- Returns {'published', version} | {'conflict', current latest or ''} | {'fenced', case_id}
local latest, checkpoint, versions = KEYS[1], KEYS[2], KEYS[3]
local lineage = {latest = latest, checkpoint = checkpoint, versions = versions,
  stream = KEYS[4], events = KEYS[5], counter = KEYS[8]}
local k = {leased = KEYS[6], leases = KEYS[7], done = KEYS[9], attempts = KEYS[10],
  rejected = KEYS[11], retire = KEYS[12]}
local version, sha256 = ARGV[2], ARGV[5]
local published = {version = version, parent = ARGV[3], weights = ARGV[4], sha256 = sha256,
  meta = ARGV[6], stream_maxlen = ARGV[7], events_maxlen = ARGV[8], trainer = ARGV[9]}
local n_leases = tonumber(ARGV[10])
local FIRST_CASE_KEY = 13

local current = redis.call('GET', latest) or ''
-- The client retried this very publish (its reply was lost with a failing primary's
-- connection, and the first run had reached the new one): it is done, do not redo it.
if current == version and redis.call('HGET', checkpoint, 'sha256') == sha256 then
  return {'published', version}
end
if current ~= ARGV[1] then return {'conflict', current} end

local now_ms = redis_now_ms()
for i = 11, 10 + 3 * n_leases, 3 do
  if not lease_holds(k.leased, k.leases, ARGV[i], ARGV[i + 1], now_ms) then return {'fenced', ARGV[i]} end
end
store_checkpoint(lineage, published, now_ms)

local n = 0
for i = 11, 10 + 3 * n_leases, 3 do
  finish_case(k, ARGV[i], KEYS[FIRST_CASE_KEY + n], ARGV[i + 2], '', now_ms)
  n = n + 1
end

local i = 11 + 3 * n_leases
for key = FIRST_CASE_KEY + n_leases, #KEYS do
  redis.call('DEL', KEYS[key])
  redis.call('ZREM', versions, ARGV[i])
  i = i + 1
end
return {'published', version}

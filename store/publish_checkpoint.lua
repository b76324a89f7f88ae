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
local lineage = {latest = KEYS[1], checkpoint = KEYS[2], versions = KEYS[3], stream = KEYS[4],
  events = KEYS[5], counter = KEYS[8]}
local k = {leased = KEYS[6], leases = KEYS[7], done = KEYS[9], attempts = KEYS[10],
  rejected = KEYS[11], retire = KEYS[12]}
local published = checkpoint_args()
local n_leases = tonumber(ARGV[10])
local FIRST_CASE_KEY = 13

local refused = refusal_before_storing(lineage, published, ARGV[1])
if refused then return refused end

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

drop_stale(lineage.versions, FIRST_CASE_KEY + n_leases, 11 + 3 * n_leases)
return {'published', published.version}

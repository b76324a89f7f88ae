-- Finish leased cases: all or none, and only while the caller holds every lease (current
-- token, deadline not passed). Each case moves from leased to done, its stored blob is
-- replaced (retraining count), and a gate refusal is recorded with its reason.
--
-- KEYS: 1 leased, 2 leases, 3 done, 4 attempts, 5 rejected, 6.. one case key per case
-- ARGV: 1 rejection reason ('' when accepted), then per case (3): case_id, token, blob ('' keeps it)
-- Returns {'done', count} | {'fenced', case_id}
local leased, leases, done, attempts, rejected = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local reason = ARGV[1]
local now_ms = redis_now_ms()

for i = 2, #ARGV, 3 do
  if not lease_holds(leased, leases, ARGV[i], ARGV[i + 1], now_ms) then return {'fenced', ARGV[i]} end
end

local n = 0
for i = 2, #ARGV, 3 do
  local case_id, blob = ARGV[i], ARGV[i + 2]
  n = n + 1
  redis.call('ZREM', leased, case_id)
  redis.call('HDEL', leases, case_id)
  redis.call('HDEL', attempts, case_id)
  redis.call('SADD', done, case_id)
  if reason ~= '' then
    redis.call('HSET', rejected, case_id, reason)
  else
    redis.call('HDEL', rejected, case_id)
  end
  if blob ~= '' then redis.call('SET', KEYS[5 + n], blob) end
end
return {'done', n}

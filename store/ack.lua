-- Finish leased cases: all or none, and only while the caller holds every lease (current
-- token, deadline not passed). Each case moves from leased to done, its stored blob is
-- replaced (retraining count), and a gate refusal is recorded with its reason. Every lease
-- is checked before the first write.
--
-- KEYS: 1 leased, 2 leases, 3 done, 4 attempts, 5 rejected, 6 retire, 7.. one case key per case
-- ARGV: 1 rejection reason ('' when accepted), then per case (3): case_id, token, blob ('' keeps it)
-- Returns {'done', count} | {'fenced', case_id}
local k = {leased = KEYS[1], leases = KEYS[2], done = KEYS[3], attempts = KEYS[4],
  rejected = KEYS[5], retire = KEYS[6]}
local reason = ARGV[1]
local now_ms = redis_now_ms()

for i = 2, #ARGV, 3 do
  if not lease_holds(k.leased, k.leases, ARGV[i], ARGV[i + 1], now_ms) then return {'fenced', ARGV[i]} end
end

local n = 0
for i = 2, #ARGV, 3 do
  n = n + 1
  finish_case(k, ARGV[i], KEYS[6 + n], ARGV[i + 2], reason, now_ms)
end
return {'done', n}

-- Extend live leases by lease ms from now (Redis TIME). A lease whose token is no longer the
-- current one, or whose deadline already passed, is not extended: it is lost, and its holder
-- must stop (the reaper or another worker owns the case now).
--
-- KEYS: 1 leased, 2 leases
-- ARGV: 1 lease ms, then per lease (2): case_id, fencing token
-- Returns the case ids no longer held
local leased, leases = KEYS[1], KEYS[2]
local now_ms = redis_now_ms()

local lost = {}
for i = 2, #ARGV, 2 do
  local case_id = ARGV[i]
  if lease_holds(leased, leases, case_id, ARGV[i + 1], now_ms) then
    redis.call('ZADD', leased, 'XX', now_ms + tonumber(ARGV[1]), case_id)
  else
    table.insert(lost, case_id)
  end
end
return lost

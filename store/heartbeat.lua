-- Extend live leases by lease ms from now (Redis TIME). A lease whose token is no longer the
-- current one, or whose deadline already passed, is not extended: it is lost, and its holder
-- must stop (the reaper or another worker owns the case now). The session the leases are
-- trained in gets the same deadline: while its trainer beats, no reaper closes it.
--
-- KEYS: 1 leased, 2 leases, 3 open sessions
-- ARGV: 1 lease ms, 2 session id ('' for none), then per lease (2): case_id, fencing token
-- Returns the case ids no longer held
local leased, leases, open_sessions = KEYS[1], KEYS[2], KEYS[3]
local now_ms = redis_now_ms()
local deadline = now_ms + tonumber(ARGV[1])

local held, lost = {}, {}
for i = 3, #ARGV, 2 do
  local case_id = ARGV[i]
  if lease_holds(leased, leases, case_id, ARGV[i + 1], now_ms) then
    table.insert(held, case_id)
  else
    table.insert(lost, case_id)
  end
end
for _, case_id in ipairs(held) do
  redis.call('ZADD', leased, 'XX', deadline, case_id)
end
if ARGV[2] ~= '' then redis.call('ZADD', open_sessions, 'XX', deadline, ARGV[2]) end
return lost

-- Shared by the lease scripts (store/scripts.py puts it, after clock.lua, in front of each):
-- the one rule that says whether a worker still holds a lease.

-- A lease holds when its token is the current one and its deadline has not passed.
local function lease_holds(leased, leases, case_id, token, now_ms)
  local record = redis.call('HGET', leases, case_id)
  local deadline = redis.call('ZSCORE', leased, case_id)
  if not record or not deadline or tonumber(deadline) <= now_ms then return false end
  return cmsgpack.unpack(record).token == tonumber(token)
end

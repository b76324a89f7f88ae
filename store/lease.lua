-- Shared by the lease scripts (store/scripts.py puts it in front of each): the time and
-- the one rule that says whether a worker still holds a lease.

-- Now, by Redis's clock, in ms: every worker's deadlines are judged by the same clock.
local function redis_now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- A lease holds when its token is the current one and its deadline has not passed.
local function lease_holds(leased, leases, case_id, token, now_ms)
  local record = redis.call('HGET', leases, case_id)
  local deadline = redis.call('ZSCORE', leased, case_id)
  if not record or not deadline or tonumber(deadline) <= now_ms then return false end
  return cmsgpack.unpack(record).token == tonumber(token)
end


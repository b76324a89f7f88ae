-- Shared by the lease scripts (store/scripts.py puts it, after clock.lua, in front of each):
-- the one rule that says whether a worker still holds a lease, and how a leased case ends.

-- The lease record, decoded; nil when there is none or it cannot be read (then the lease is
-- not held by anyone who can prove it, and the case goes back to the queue).
local function lease_record(leases, case_id)
  local record = redis.call('HGET', leases, case_id)
  if not record then return nil end
  local ok, lease = pcall(cmsgpack.unpack, record)
  if ok and type(lease) == 'table' then return lease end
  return nil
end

-- A lease holds when its token is the current one and its deadline has not passed.
local function lease_holds(leased, leases, case_id, token, now_ms)
  local lease = lease_record(leases, case_id)
  local deadline = redis.call('ZSCORE', leased, case_id)
  if not lease or not deadline or tonumber(deadline) <= now_ms then return false end
  return lease.token == tonumber(token)
end

-- Finish a leased case (its lease was checked): leased -> done, its updated blob stored
-- ('' keeps it), a gate refusal recorded (reason '' clears it), and on the retention index.
local function finish_case(k, case_id, case_key, blob, reason, now_ms)
  redis.call('ZREM', k.leased, case_id)
  redis.call('HDEL', k.leases, case_id)
  redis.call('HDEL', k.attempts, case_id)
  redis.call('SADD', k.done, case_id)
  redis.call('ZADD', k.retire, now_ms, case_id)
  if reason ~= '' then
    redis.call('HSET', k.rejected, case_id, reason)
  else
    redis.call('HDEL', k.rejected, case_id)
  end
  if blob ~= '' then redis.call('SET', case_key, blob) end
end

-- Shared (store/scripts.py puts it in front of the scripts that use it): the time.

-- Now, by Redis's clock, in ms: every worker's deadlines are judged by the same clock.
local function redis_now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- A consumer leaves its group (XGROUP DELCONSUMER) only when that loses nothing: it holds no
-- pending entry (deleting a consumer drops its pending entries for good) and has been idle
-- at least the given time. One script, so no entry can be delivered to it between the check
-- and the delete.
--
-- KEYS: 1 stream
-- ARGV: 1 group, 2 consumer, 3 minimum idle ms (0: any)
-- Returns {outcome, number}: {'deleted', 0}, {'pending', entries it holds},
--   {'active', its idle ms}, or {'absent', 0} (no such stream, group or consumer)
local stream, group, consumer, min_idle_ms = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])

local consumers = redis.pcall('XINFO', 'CONSUMERS', stream, group)
if consumers.err then return {'absent', 0} end
for _, info in ipairs(consumers) do
  local fields = {}
  for i = 1, #info, 2 do fields[info[i]] = info[i + 1] end
  if fields['name'] == consumer then
    if fields['pending'] > 0 then return {'pending', fields['pending']} end
    if fields['idle'] < min_idle_ms then return {'active', fields['idle']} end
    redis.call('XGROUP', 'DELCONSUMER', stream, group, consumer)
    return {'deleted', 0}
  end
end
return {'absent', 0}

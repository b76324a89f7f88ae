-- Shared by claim.lua and requeue.lua (store/scripts.py puts it in front of each): the
-- held-out rule, the same as store/queue.py is_held_out.

-- A case is held out when the first 32 bits of the SHA-1 of its id fall below `threshold`
-- (share * 2^32; 0 holds nothing out).
local function held_out(case_id, threshold)
  return threshold > 0 and tonumber(string.sub(redis.sha1hex(case_id), 1, 8), 16) < threshold
end

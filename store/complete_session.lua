-- Close a training session: store its final record, and, only if it was still open, take it
-- off the open sessions, announce it (training_completed) and count its outcome. So a
-- session is announced once, whether its trainer closes it or a reaper closes it for a
-- trainer that stopped beating (mode 'abandoned': only once its deadline has passed). Also
-- drops the sessions beyond the newest NEGCASE_SESSIONS_KEPT (the archive keeps them).
-- Everything is read and decided before the first write.
--
-- KEYS: 1 open sessions, 2 the session key, 3 sessions, 4 events, 5 stats,
--       6.. keys of the sessions to drop, in ARGV order
-- ARGV: 1 session id, 2 session blob, 3 training_completed event (msgpack array of field,
--       value), 4 stats field to count, 5 events maxlen, 6 mode ('own' | 'abandoned'),
--       7 start time ms, then the ids of the sessions to drop
-- Returns 'closed' | 'already_closed' | 'alive' (mode 'abandoned', deadline not passed)
local open_sessions, session_key, sessions, events, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local session_id, blob, event, stat, events_maxlen, mode, start_ms =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local deadline = redis.call('ZSCORE', open_sessions, session_id)
if mode == 'abandoned' and (not deadline or tonumber(deadline) > now_ms) then return 'alive' end
local closing = deadline ~= false
local fields = closing and cmsgpack.unpack(event) or {}
local counted = (tonumber(redis.call('HGET', stats, stat)) or 0) + 1

redis.call('SET', session_key, blob)
redis.call('ZADD', sessions, start_ms, session_id)
if closing then
  redis.call('ZREM', open_sessions, session_id)
  redis.call('XADD', events, 'MAXLEN', '~', events_maxlen, '*', unpack(fields))
  redis.call('HSET', stats, stat, string.format('%d', counted))
end
for d = 8, #ARGV do
  redis.call('ZREM', sessions, ARGV[d])
  redis.call('ZREM', open_sessions, ARGV[d])
  redis.call('DEL', KEYS[d - 2])
end
return closing and 'closed' or 'already_closed'

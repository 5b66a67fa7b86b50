-- room_open: what a join needs to know about a room, creating its epoch if it has none.
--
-- KEYS[1]  the room's stream            hub:{room}:s
-- KEYS[2]  the room's meta hash         hub:{room}:meta
-- ARGV[1]  epoch to set if the room has none yet (random hex from the caller)
--
-- Returns {epoch, min_id, first_id, last_id}:
--   epoch    the room's epoch (changes only when Redis lost the room's data);
--   min_id   entries below this id may have been trimmed ("0-0" when nothing ever was);
--   first_id the oldest entry's id, or "0-0" for an empty or missing stream;
--   last_id  the newest entry's id, or "0-0" for an empty or missing stream.
--
-- Atomic, so two nodes opening a new room at once agree on one epoch.
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[2], 'epoch', epoch)
end
local min_id = redis.call('HGET', KEYS[2], 'min_id') or '0-0'
local first_id, last_id = '0-0', '0-0'
if redis.call('EXISTS', KEYS[1]) == 1 then
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if #newest > 0 then
    last_id = newest[1][1]
    first_id = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1]
  end
end
return {epoch, min_id, first_id, last_id}

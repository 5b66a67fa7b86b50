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
--   last_id  the newest id the stream ever generated (XINFO last-generated-id, so a stream trimmed
--            empty still knows its top), or "0-0" for a missing stream.
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
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      last_id = info[i + 1]
    elseif info[i] == 'first-entry' and info[i + 1] then
      first_id = info[i + 1][1]
    end
  end
end
return {epoch, min_id, first_id, last_id}

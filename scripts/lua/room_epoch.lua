-- room_epoch: the room's epoch, created if the room has none (a room a backend's raw XADD made).
--
-- KEYS[1]  the room's meta hash   hub:{room}:meta
-- ARGV[1]  epoch to set if none (random hex from the caller)
--
-- Returns the epoch. Atomic, so the archiver and hub nodes agree on one epoch per room.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
return epoch

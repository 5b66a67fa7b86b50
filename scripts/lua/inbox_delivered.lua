-- inbox_delivered: move a user's inbox "delivered" mark forward (never back).
--
-- KEYS[1]  the inbox's meta hash   hub:{inbox:USER}:meta
-- ARGV[1]  the newest stream id delivered to one of the user's connections
--
-- Returns the mark after the call. Atomic, so two nodes delivering at once cannot move it back.
--! include stream_ids
local current = redis.call('HGET', KEYS[1], 'delivered') or '0-0'
if less(current, ARGV[1]) then
  redis.call('HSET', KEYS[1], 'delivered', ARGV[1])
  return ARGV[1]
end
return current

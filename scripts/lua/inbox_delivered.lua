-- inbox_delivered: move a user's inbox "delivered" mark forward (never back).
--
-- KEYS[1]  the inbox's meta hash   hub:{inbox:USER}:meta
-- ARGV[1]  the newest stream id delivered to one of the user's connections
--
-- Returns the mark after the call. Atomic, so two nodes delivering at once cannot move it back.
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local current = redis.call('HGET', KEYS[1], 'delivered') or '0-0'
local cm, cs = parse(current)
local nm, ns = parse(ARGV[1])
if nm > cm or (nm == cm and ns > cs) then
  redis.call('HSET', KEYS[1], 'delivered', ARGV[1])
  return ARGV[1]
end
return current

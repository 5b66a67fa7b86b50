-- presence_set: set or clear one connection's presence in a room, and tell the room when the
-- user's presence there changes.
--
-- KEYS[1]  the room's presence hash   hub:{room}:presence   (field: user id, value: "conn=o;conn=a;...")
-- ARGV[1]  user id
-- ARGV[2]  connection id
-- ARGV[3]  "online", "away", or "" to remove the connection
-- ARGV[4]  the room's event channel  hub:{room}:ev
-- ARGV[5]  the room name (for the frame)
-- ARGV[6]  the time of the change, ISO 8601 (last_seen in the frame)
--
-- Returns the user's presence in the room after the call: "online" if any of their connections
-- there is online, "away" if all are away, "offline" if none is left. When that changes, a
-- presence_update frame {user_id, status, last_seen, room} is published on the channel.
-- Atomic per (room, user): two devices changing at once cannot both miss or double the change.
local function aggregate(conns)
  local status = 'offline'
  for _, s in pairs(conns) do
    if s == 'o' then return 'online' end
    status = 'away'
  end
  return status
end
local conns = {}
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  for conn, s in string.gmatch(current, '([^=;]+)=([oa])') do
    conns[conn] = s
  end
end
local before = aggregate(conns)
if ARGV[3] == '' then
  conns[ARGV[2]] = nil
elseif ARGV[3] == 'away' then
  conns[ARGV[2]] = 'a'
else
  conns[ARGV[2]] = 'o'
end
local parts = {}
for conn, s in pairs(conns) do
  parts[#parts + 1] = conn .. '=' .. s
end
if #parts == 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], table.concat(parts, ';'))
end
local after = aggregate(conns)
if after ~= before then
  redis.call('PUBLISH', ARGV[4], cjson.encode({type = 'presence_update', user_id = ARGV[1], status = after,
                                               last_seen = ARGV[6], room = ARGV[5]}))
end
return after

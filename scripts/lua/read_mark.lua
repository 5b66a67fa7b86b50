-- read_mark: move a user's read position in a room forward and tell the room's members.
--
-- KEYS[1]  the room's read-receipt hash   hub:{room}:read
-- KEYS[2]  the room's stream              hub:{room}:s
-- ARGV[1]  user id
-- ARGV[2]  stream id read up to ("<ms>-<seq>")
-- ARGV[3]  the room's event channel       hub:{room}:ev
-- ARGV[4]  the room name (for the frame)
--
-- Returns the user's read position after the call. It never moves back, and never past the
-- stream's newest id. When it moved, a read_receipt frame {room, user_id, up_to} is published.
--! include stream_ids
local up_to = ARGV[2]
local newest = '0-0'
if redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then newest = info[i + 1] end
  end
end
if less(newest, up_to) then
  up_to = newest
end
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and not less(current, up_to) then
  return current
end
if up_to == '0-0' then
  return '0-0'
end
redis.call('HSET', KEYS[1], ARGV[1], up_to)
redis.call('PUBLISH', ARGV[3], cjson.encode({type = 'read_receipt', room = ARGV[4], user_id = ARGV[1],
                                             up_to = up_to}))
return up_to

-- typing_set: start, refresh or stop one user's typing indicator in a room, telling members only
-- when the state changes (so a client repeating typing_start every second costs one SET, no fan-out).
--
-- KEYS[1]  the user's typing key in the room   hub:{room}:typing:{user_id}
-- ARGV[1]  "1" to start/refresh, "0" to stop
-- ARGV[2]  TTL in milliseconds (a typing never stopped expires by itself)
-- ARGV[3]  the room's event channel            hub:{room}:ev
-- ARGV[4]  the typing_indicator frame to publish when the state changes (JSON)
--
-- Returns 1 when the state changed (and the frame was published), else 0.
-- The channel rides in ARGV because PUBLISH is not a key operation; it shares the room's hash tag.
if ARGV[1] == '1' then
  local created = redis.call('SET', KEYS[1], '1', 'PX', tonumber(ARGV[2]), 'NX')
  if created then
    redis.call('PUBLISH', ARGV[3], ARGV[4])
    return 1
  end
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 0
end
if redis.call('DEL', KEYS[1]) == 1 then
  redis.call('PUBLISH', ARGV[3], ARGV[4])
  return 1
end
return 0

-- room_publish: append one client message to a room's stream, idempotently, optionally rate-limited,
-- and announce it.
--
-- KEYS[1]  the room's stream            hub:{room}:s
-- KEYS[2]  the room's meta hash         hub:{room}:meta
-- KEYS[3]  with flag "i": the idempotency key   hub:{room}:idem:{sender}:{client_msg_id}
-- KEYS[#]  with flag "r": the sender's rate key hub:rl:{user:ID}:msg (last key; another slot, so
--          only on a single Redis: on a cluster the caller runs rate_gcra.lua first instead)
-- ARGV[1]  epoch to set if the room has none yet (random hex from the caller)
-- ARGV[2]  idempotency TTL in seconds (used only with flag "i")
-- ARGV[3]  channel to announce the new entry on (the room's :ev channel), or '' for none
-- ARGV[4]  flags: "" or any of "i" (idempotency key given), "r" (rate key given)
-- ARGV[5]  with "r": GCRA emission interval in microseconds; ARGV[6] with "r": burst (see rate_gcra.lua)
-- ARGV[7]  the entry's fields, msgpack [field, value, field, value, ...] (one argument instead of
--          dozens: the caller packs it in one C call instead of encoding every argument)
--
-- Returns {stream_id, epoch, duplicate, retry_after_ms}:
--   appended          {id, epoch, 0, 0}
--   duplicate         {original id, epoch, 1, 0}: the idempotency key already named an entry; nothing
--                     appended and nothing charged
--   rate-limited      {'', '', 0, retry_after_ms}: nothing appended (retry_after_ms -1: never fits)
--
-- Atomic: the epoch is created with the room's first entry, a retried client_msg_id can never
-- append twice, and a refused message leaves no trace. No MAXLEN here: streams are trimmed only
-- below what the archiver committed.
--
-- The announcement is the entry itself, msgpack [id, field, value, ...], published right after the
-- XADD (whose keyspace notification it therefore follows on every subscriber's connection): nodes
-- deliver it without reading the stream back. See hub/relay.py for how the two are paired.
if redis.replicate_commands then
  redis.replicate_commands()  -- Redis 6.2: the rate check writes after TIME (7.0: a no-op)
end

--! include gcra

local flags = ARGV[4]
local idempotent = string.find(flags, 'i', 1, true) ~= nil
local rated = string.find(flags, 'r', 1, true) ~= nil

if idempotent then
  local previous = redis.call('GET', KEYS[3])
  if previous then
    return {previous, redis.call('HGET', KEYS[2], 'epoch') or ARGV[1], 1, 0}
  end
end
local fields = cmsgpack.unpack(ARGV[7])
if rated then
  local decision = gcra(KEYS[#KEYS], tonumber(ARGV[5]), tonumber(ARGV[6]), 1)
  if not decision then
    return redis.error_reply('ERR room_publish: bad rate arguments')
  end
  if decision[1] == 0 then
    return {'', '', 0, decision[2]}
  end
end
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[2], 'epoch', epoch)
end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
if idempotent then
  redis.call('SET', KEYS[3], id, 'EX', tonumber(ARGV[2]))
end
if ARGV[3] ~= '' then
  table.insert(fields, 1, id)
  redis.call('PUBLISH', ARGV[3], cmsgpack.pack(fields))
end
return {id, epoch, 0, 0}

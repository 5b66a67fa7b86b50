-- room_publish: append one client message to a room's stream, idempotently, and announce it.
--
-- KEYS[1]  the room's stream            hub:{room}:s
-- KEYS[2]  the room's meta hash         hub:{room}:meta
-- KEYS[3]  (optional) idempotency key   hub:{room}:idem:{sender}:{client_msg_id}
-- ARGV[1]  epoch to set if the room has none yet (random hex from the caller)
-- ARGV[2]  idempotency TTL in seconds (used only with KEYS[3])
-- ARGV[3]  channel to announce the new entry on (the room's :ev channel), or '' for none
-- ARGV[4..] field, value, field, value, ... for XADD
--
-- Returns {stream_id, epoch, duplicate} where duplicate is 1 when KEYS[3] already named a
-- stream id (the original id is returned and nothing is appended), else 0.
--
-- Atomic: the epoch is created with the room's first entry, and a retried client_msg_id can never
-- append twice. No MAXLEN here: streams are trimmed only below what the archiver committed.
--
-- The announcement is the entry itself, msgpack [id, field, value, ...], published right after the
-- XADD (whose keyspace notification it therefore follows on every subscriber's connection): nodes
-- deliver it without reading the stream back. See hub/relay.py for how the two are paired.
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[2], 'epoch', epoch)
end
if #KEYS >= 3 then
  local previous = redis.call('GET', KEYS[3])
  if previous then
    return {previous, epoch, 1}
  end
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4))
if #KEYS >= 3 then
  redis.call('SET', KEYS[3], id, 'EX', tonumber(ARGV[2]))
end
if ARGV[3] ~= '' then
  redis.call('PUBLISH', ARGV[3], cmsgpack.pack({id, unpack(ARGV, 4)}))
end
return {id, epoch, 0}

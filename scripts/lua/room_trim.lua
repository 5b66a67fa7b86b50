-- room_trim: drop a room's entries that are both archived and older than the hot window.
--
-- KEYS[1]  the room's stream      hub:{room}:s
-- KEYS[2]  the room's meta hash   hub:{room}:meta
-- ARGV[1]  the archiver's consumer group name
-- ARGV[2]  hot-window floor: entries with ids below this may go ("<ms>-0")
--
-- Returns the new trim watermark (entries below it may be gone), or "" when nothing was trimmed.
--
-- Safe point = the group's oldest pending entry (delivered but not yet committed+acked), or, when
-- nothing is pending, just after the last entry the group read. Entries below min(safe point,
-- hot-window floor) are trimmed with XTRIM MINID and the watermark is stored in meta.min_id, which
-- resume checks. Atomic: no entry can be archived-and-trimmed in between.
--! include stream_ids
if redis.call('EXISTS', KEYS[1]) == 0 then
  return ''
end
local last_delivered = nil
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, delivered = nil, nil
  for i = 1, #group, 2 do
    if group[i] == 'name' then name = group[i + 1] end
    if group[i] == 'last-delivered-id' then delivered = group[i + 1] end
  end
  if name == ARGV[1] then last_delivered = delivered end
end
if not last_delivered then
  return ''
end
local safe
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])
if pending[1] > 0 then
  safe = pending[2]
else
  local ms, seq = parse(last_delivered)
  safe = ms .. '-' .. (seq + 1)
end
if less(ARGV[2], safe) then
  safe = ARGV[2]
end
local current = redis.call('HGET', KEYS[2], 'min_id') or '0-0'
if not less(current, safe) then
  return ''
end
-- Only a trim that removed something moves the watermark: a resume is refused below it.
if redis.call('XTRIM', KEYS[1], 'MINID', safe) == 0 then
  return ''
end
redis.call('HSET', KEYS[2], 'min_id', safe)
return safe

-- reminders_claim: take the reminders that are due, with a lease.
--
-- KEYS[1]  due reminders      hub:{reminders}:due      (member: reminder JSON, score: due time ms)
-- KEYS[2]  claimed reminders  hub:{reminders}:claimed  (member: reminder JSON, score: lease end ms)
-- ARGV[1]  now (ms)
-- ARGV[2]  lease (ms)
-- ARGV[3]  how many at most
--
-- Returns {next, claimed reminders (JSON strings)...}: next is the earliest time (ms) anything is due
-- after this claim, in either set (-1 when both are empty), so a node can sleep until then instead of
-- polling. Each claimed reminder moves from due to claimed with a lease; a claim whose lease ran out
-- (its node died before publishing and removing it) is claimed again.
-- Publishing is idempotent per reminder id, so a reminder is delivered once even when claimed twice.
local now = tonumber(ARGV[1])
local lease_end = now + tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local taken = {}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)) do
  redis.call('ZADD', KEYS[2], lease_end, member)
  taken[#taken + 1] = member
end
if #taken < limit then
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit - #taken)) do
    redis.call('ZREM', KEYS[1], member)
    redis.call('ZADD', KEYS[2], lease_end, member)
    taken[#taken + 1] = member
  end
end
local next_due = -1
for _, key in ipairs(KEYS) do
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] ~= nil then
    local score = tonumber(first[2])
    if next_due < 0 or score < next_due then next_due = score end
  end
end
table.insert(taken, 1, next_due)
return taken

-- reminders_claim: take the reminders that are due, with a lease.
--
-- KEYS[1]  due reminders      hub:{reminders}:due      (member: reminder JSON, score: due time ms)
-- KEYS[2]  claimed reminders  hub:{reminders}:claimed  (member: reminder JSON, score: lease end ms)
-- ARGV[1]  now (ms)
-- ARGV[2]  lease (ms)
-- ARGV[3]  how many at most
--
-- Returns the claimed reminders (JSON strings). Each moves from due to claimed with a lease; a
-- claim whose lease ran out (its node died before publishing and removing it) is claimed again.
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
return taken

-- conn_acquire: take one lease on a concurrent-connection cap (per IP, per user, ...).
--
-- KEYS[1]  the cap's sorted set       hub:cc:{ip:ADDR}, hub:cc:{user:ID}
-- ARGV[1]  member: the connection id (unique across nodes, e.g. node id + local id)
-- ARGV[2]  limit: most leases held at once, integer >= 0
-- ARGV[3]  lease in milliseconds: the member is dropped this long after its last acquire/refresh
--
-- Returns {admitted, current_count, retry_after_ms}:
--   admitted        1 when the member now holds a lease, else 0
--   current_count   leases held after this call (including this one when admitted)
--   retry_after_ms  0 when admitted; else the time until the earliest lease would expire if its
--                   owner stopped refreshing (a hint: a live owner keeps its lease)
--
-- Members are scored by lease expiry (ms on the Redis clock). Expired members are removed first,
-- so a node killed with its connections stops counting one lease period later: no count stays
-- stuck high. Acquiring a member that already holds a lease renews it and is admitted without
-- counting twice (a retried acquire is harmless). The key expires with its last lease.
--
-- Atomic: prune, count and add happen in one script, so concurrent acquires on every node never
-- admit more than the limit.
if redis.replicate_commands then
  redis.replicate_commands()
end

local member = ARGV[1]
local limit = tonumber(ARGV[2])
local lease_ms = tonumber(ARGV[3])
if not limit or limit < 0 or not lease_ms or lease_ms < 1 then
  return redis.error_reply('ERR conn_acquire: bad arguments')
end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
-- %.0f: a plain number would be formatted with 14 significant digits.
local now_s = string.format('%.0f', now)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_s)

local held = redis.call('ZSCORE', KEYS[1], member)
local count = redis.call('ZCARD', KEYS[1])
if not held and count >= limit then
  local retry = 0
  local earliest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if earliest[2] then
    retry = math.max(1, tonumber(earliest[2]) - now)
  end
  return {0, count, retry}
end

local expiry = now + lease_ms
redis.call('ZADD', KEYS[1], string.format('%.0f', expiry), member)
if not held then
  count = count + 1
end
-- The key lives as long as its longest lease.
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[1], string.format('%.0f', math.max(1, tonumber(last[2]) - now)))
return {1, count, 0}

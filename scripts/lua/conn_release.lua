-- conn_release: give back one lease on a concurrent-connection cap (the connection closed).
--
-- KEYS[1]  the cap's sorted set       hub:cc:{ip:ADDR}, hub:cc:{user:ID}
-- ARGV[1]  member: the connection id that held the lease
--
-- Returns {released, current_count}: released is 1 when the member held a lease (0 when it had
-- already expired or been released: releasing twice is harmless); current_count counts the
-- leases still held, expired ones excluded.
--
-- Expired members are removed too, so the count is true. The key's expiry is left alone: removing
-- members never makes the longest lease longer. Atomic with conn_acquire and conn_refresh.
if redis.replicate_commands then
  redis.replicate_commands()
end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
local released = redis.call('ZREM', KEYS[1], ARGV[1])
return {released, redis.call('ZCARD', KEYS[1])}

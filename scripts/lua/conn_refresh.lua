-- conn_refresh: renew the leases of many members of one connection cap (a node's periodic beat).
--
-- KEYS[1]  the cap's sorted set       hub:cc:{ip:ADDR}, hub:cc:{user:ID}
-- ARGV[1]  lease in milliseconds: each renewed member is dropped this long from now
-- ARGV[2..] members (connection ids) whose leases to renew
--
-- Returns the members that no longer held a lease (expired or released): they are NOT re-added,
-- because the cap may have been given to someone else meanwhile. The caller should acquire them
-- again or close those connections. An empty array means every lease was renewed.
--
-- Expired members are removed first, so a late refresh cannot revive a lease that already lapsed.
-- The key expires with its last lease. Atomic with conn_acquire and conn_release.
if redis.replicate_commands then
  redis.replicate_commands()
end

local lease_ms = tonumber(ARGV[1])
if not lease_ms or lease_ms < 1 then
  return redis.error_reply('ERR conn_refresh: bad arguments')
end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))

local expiry = string.format('%.0f', now + lease_ms)
local lost = {}
for i = 2, #ARGV do
  -- XX: renew only a lease that is still held.
  if redis.call('ZADD', KEYS[1], 'XX', 'CH', expiry, ARGV[i]) == 0
      and not redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    lost[#lost + 1] = ARGV[i]
  end
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then
  redis.call('PEXPIRE', KEYS[1], string.format('%.0f', math.max(1, tonumber(last[2]) - now)))
end
return lost

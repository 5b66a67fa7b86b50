-- rate_gcra: one rate-limit decision with GCRA (generic cell rate algorithm) on the Redis clock.
--
-- KEYS[1]  the limiter's key             hub:rl:{user:ID}:msg, hub:rl:{ip:ADDR}:connect, ...
-- ARGV[1]  emission interval in microseconds (60e6 / rate_per_min, rounded up), integer >= 1
-- ARGV[2]  burst: cells that may be spent at once from an idle key, integer >= 1
-- ARGV[3]  cost of this request in cells (optional, default 1); 0 asks without spending
--
-- Returns {allowed, retry_after_ms, remaining}:
--   allowed         1 when the request fits (and was charged), else 0 (nothing was charged)
--   retry_after_ms  0 when allowed; when refused, the wait after which the same request fits
--                   (rounded up, so waiting exactly this long is enough); -1 when it never can
--                   (cost > burst)
--   remaining       whole cells that could still be spent right now, after this decision
--
-- The key holds the theoretical arrival time (TAT, microseconds on the Redis clock). A request of
-- cost c fits when max(TAT, now) + c*T - burst*T <= now; in any window of length W at most
-- burst + W/T cells are admitted. The key expires at its TAT (PX), the instant it becomes
-- equivalent to an absent key, so idle limiters cost no memory. Refusals write nothing.
--
-- Atomic: one script per decision, clock read inside it, so every node shares one timeline.
-- Redis 6.2 needs effects replication before a write that follows TIME; 7.0 does it by default
-- (replicate_commands is then a deprecated no-op), so the call is guarded, not removed.
if redis.replicate_commands then
  redis.replicate_commands()
end

--! include gcra

local decision = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3] or '1'))
if not decision then
  return redis.error_reply('ERR rate_gcra: bad arguments')
end
return decision

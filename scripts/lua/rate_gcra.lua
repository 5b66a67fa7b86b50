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

local interval_us = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3] or '1')
if not interval_us or interval_us < 1 or not burst or burst < 1 or not cost or cost < 0 then
  return redis.error_reply('ERR rate_gcra: bad arguments')
end

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then
  tat = now
end
local tolerance = burst * interval_us

local function remaining_at(t)
  -- Cells spendable at `now` if the TAT were t; below 0 only after the burst was lowered.
  return math.max(0, math.floor((now + tolerance - t) / interval_us))
end

if cost > burst then
  return {0, -1, remaining_at(tat)}
end

local new_tat = tat + cost * interval_us
local allow_at = new_tat - tolerance
if allow_at > now then
  return {0, math.ceil((allow_at - now) / 1000), remaining_at(tat)}
end

if cost > 0 then
  -- %.0f: a plain number would be formatted with 14 significant digits and lose microseconds.
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
             'PX', string.format('%.0f', math.ceil((new_tat - now) / 1000)))
end
return {1, 0, remaining_at(new_tat)}

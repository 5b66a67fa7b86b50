-- Library (included with "--! include gcra"): one GCRA decision on the Redis clock; see rate_gcra.lua
-- for the algorithm and the meaning of the reply. Callers must have called redis.replicate_commands()
-- (Redis 6.2) before, since this writes after TIME.
local function gcra(key, interval_us, burst, cost)
  if not interval_us or interval_us < 1 or not burst or burst < 1 or not cost or cost < 0 then
    return nil
  end
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
  local tat = tonumber(redis.call('GET', key) or '0') or 0
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
    redis.call('SET', key, string.format('%.0f', new_tat),
               'PX', string.format('%.0f', math.ceil((new_tat - now) / 1000)))
  end
  return {1, 0, remaining_at(new_tat)}
end

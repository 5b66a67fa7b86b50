-- Library (included by scripts with "--! include stream_ids"): stream id helpers.
-- parse("1700000000000-5") -> 1700000000000, 5;  less(a, b) -> a < b in stream order.
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end

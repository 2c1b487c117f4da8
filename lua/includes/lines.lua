--[[
  Reads the lines of one reservation part. The caller passes each line's SKU in ARGV (starting at
  `first_argv`) and the SKU's hash and per-user hash in KEYS (starting at `first_key`), in the same order.
  Returns nil when the caller's view is stale: a named SKU is not a line of this part, a SKU is named
  twice, or the caller named fewer lines than the part has (acting on some lines while changing the whole part's status
  would strand the others' units).
]]
local function read_lines(part, n, first_argv, first_key)
  if tonumber(redis.call('HGET', part, 'n')) ~= n then
    return nil
  end
  local lines, seen = {}, {}
  for i = 1, n do
    local sku = ARGV[first_argv + i - 1]
    local v = redis.call('HMGET', part, 'q:' .. sku, 'h:' .. sku)
    if not v[1] or seen[sku] then
      return nil
    end
    seen[sku] = true
    lines[i] = {
      sku = sku, qty = tonumber(v[1]), held = v[2] == '1',
      sku_key = KEYS[first_key + 2 * (i - 1)], user_key = KEYS[first_key + 2 * (i - 1) + 1],
    }
  end
  return lines
end

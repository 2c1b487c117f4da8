--[[
  Helpers shared by the stock scripts; the loader inlines this file where a script says
  `--@include common`. Nothing here builds a key name: keys always arrive through KEYS.
]]

local function num(value)
  return tonumber(value) or 0
end

-- Units a new hold may take: on_hand - safety_stock - held - sold, never below zero.
local function available(on_hand, safety, held, sold)
  local free = on_hand - safety - held - sold
  if free < 0 then
    return 0
  end
  return free
end

-- Adds delta to one user's units (held + bought) of one SKU. The field is dropped at zero so the
-- hash only holds buyers with something live, and compensation leaves it exactly as it was.
local function add_user_units(key, user, delta)
  local units = redis.call('HINCRBY', key, user, delta)
  if units <= 0 then
    redis.call('HDEL', key, user)
  end
  return units
end

-- One stock movement on the shard's stream. Counters are the SKU's values *after* the change, so a
-- consumer can check the ledger without reading Redis, and replaying `qty` by `type` rebuilds them.
local function emit(stream, kind, tenant, sku, qty, reservation, user, on_hand, held, sold, now)
  redis.call('XADD', stream, '*', 'type', kind, 'tenant', tenant, 'sku', sku, 'qty', qty,
    'res', reservation, 'user', user, 'on_hand', on_hand, 'held', held, 'sold', sold, 'at', now)
end

-- Reads the counters and settings of one SKU hash: nil when the SKU does not exist.
local function read_sku(key)
  local v = redis.call('HMGET', key, 'on_hand', 'safety_stock', 'held', 'sold', 'mode',
    'hold_ttl_seconds', 'per_user_limit')
  if not v[1] then
    return nil
  end
  return {
    on_hand = num(v[1]), safety = num(v[2]), held = num(v[3]), sold = num(v[4]),
    mode = v[5], ttl = num(v[6]), limit = num(v[7]),
  }
end

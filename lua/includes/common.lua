--[[
  Helpers shared by the stock scripts; the loader inlines this file where a script says
  `--@include common`. Nothing here builds a key name: keys always arrive through KEYS.
]]

local function num(value)
  return tonumber(value) or 0
end

-- Units promised from stock on hand: held + sold less the units promised on backorder (presale), which
-- incoming stock covers. Invariant 1 is `from_on_hand(s) <= on_hand - safety_stock` and `bo <= cap`.
local function from_on_hand(s)
  return s.held + s.sold - s.bo
end

-- Units a new hold may take from stock on hand: on_hand - safety_stock - what is promised from it.
local function on_hand_free(s)
  local free = s.on_hand - s.safety - from_on_hand(s)
  if free < 0 then
    return 0
  end
  return free
end

-- Units a new hold may take on backorder: the presale cap less the units already backordered, while the
-- presale is open (cap > 0 and, when it has an end, before it). Past its end nothing new is granted.
local function presale_free(s, now)
  if s.cap <= 0 or (s.ends > 0 and now >= s.ends) then
    return 0
  end
  local free = s.cap - s.bo
  if free < 0 then
    return 0
  end
  return free
end

-- Units a new hold may take: from stock on hand first, then on backorder.
local function available(s, now)
  return on_hand_free(s) + presale_free(s, now)
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
-- consumer can check the ledger without reading Redis. What each type does to the counters (and to
-- the user's units) is fixed, so replaying `qty` by `type` rebuilds them:
--   sku_set      on_hand := on_hand (qty = the change); settings in extra fields
--   adjusted     on_hand += qty
--   received     on_hand += qty                            (goods arrived: POST .../receipts)
--   filled       nothing but bo -= qty                     (a receipt turned a line's backordered units normal)
--   held         held += qty, user += qty                  (extra: exp, the hold's deadline, 0 = none)
--   pending      nothing (an on_payment line was reserved; qty = units asked)
--   confirmed    held -= qty, sold += qty                  (a held line paid)
--   sold         sold += qty, user += qty                  (deducted directly at payment)
--   released     held -= qty, user -= qty                  (buyer cancelled)
--   expired      held -= qty, user -= qty                  (deadline passed)
--   undone       held -= qty, user -= qty                  (compensation of a cross-shard reserve)
--   cancelled    nothing (a line that held nothing was released or undone)
--   lapsed       nothing (a line that held nothing passed its reservation's deadline)
--   unconfirmed  sold -= qty, held += qty                  (compensation of a confirm from a hold)
--   unsold       sold -= qty, user -= qty                  (compensation of a direct deduction)
-- Every event also carries `bo`, the SKU's backordered units after the change, and `av0` / `av`, the
-- units available to a new hold before and after it (presale allowance included), so a consumer such as
-- the webhooks dispatcher sees sold-out and back-in-stock moments without reading Redis. Events about a
-- reservation's line carry `lbo`, the line's backordered units after the change (0 once it no longer
-- holds or is sold).
-- Events about a reservation also carry `st`, the status of the reservation's part on this shard after
-- the change (held, pending, confirmed, released, expired, or undone for a part deleted by compensation),
-- so the ledger knows each part's state without replaying; reserve events add `exp` (the deadline, 0 =
-- none) and, on the home part's first line, `doc` (the reservation document); confirm events add `pst`
-- and `cf` (the status before and how it was confirmed: 'h' from a hold, 'd' direct).
-- Further field/value pairs follow as extra arguments. Returns the stream entry id.
-- The arguments go straight to XADD, with no table in between: building tables and strings is most of
-- what a script costs Redis (measured), and this runs once per line of every change.
local function emit(stream, kind, tenant, sku, qty, reservation, user, on_hand, held, sold, bo, av0, av, now, ...)
  return redis.call('XADD', stream, '*', 'type', kind, 'tenant', tenant, 'sku', sku, 'qty', qty,
    'res', reservation, 'user', user, 'on_hand', on_hand, 'held', held, 'sold', sold, 'bo', bo,
    'av0', av0, 'av', av, 'at', now, ...)
end

-- Removes a line's backordered units (a hold released, expired or undone; a direct sale reverted) from
-- the SKU's counter and its backorder queue; the part's `b:<sku>` field goes too. Returns the SKU's
-- backordered units after.
local function drop_backorder(sku_key, queue, part, sku, id, units)
  if units <= 0 then
    return nil
  end
  redis.call('HDEL', part, 'b:' .. sku)
  redis.call('ZREM', queue, id)
  return redis.call('HINCRBY', sku_key, 'backordered', -units)
end

-- Reads the counters and settings of one SKU hash: nil when the SKU does not exist.
local function read_sku(key)
  local v = redis.call('HMGET', key, 'on_hand', 'safety_stock', 'held', 'sold', 'mode',
    'hold_ttl_seconds', 'per_user_limit', 'backordered', 'presale_cap', 'presale_ends_at', 'channels')
  if not v[1] then
    return nil
  end
  return {
    on_hand = num(v[1]), safety = num(v[2]), held = num(v[3]), sold = num(v[4]),
    mode = v[5], ttl = num(v[6]), limit = num(v[7]), bo = num(v[8]), cap = num(v[9]), ends = num(v[10]),
    channels = num(v[11]),
  }
end

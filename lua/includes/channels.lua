--[[
  Sales channels sharing one SKU's stock (app/stock/channels.py). A SKU's channels live in one hash
  (sh:{s}:chan:<tenant>:<sku>), four fields a channel: `q:<c>` its ring-fenced quota, `u:<c>` the units
  its reservations took from the quota (held or sold), `p:<c>` its priority, `b:<c>` 1 when it may borrow
  from the shared pool. The SKU hash's `channels` field counts them, so a SKU without channels costs the
  hot path no read.

  Fences: stock on hand not yet promised is fenced for each channel up to what its quota has left
  (quota - used), channels taken in priority order (highest first, then by name), so when there is less
  than every quota's rest (stock shrank) the lowest priorities lose their fence first. What no fence
  holds is the shared pool. A reservation for a channel takes from its fence first, then (if it may
  borrow) from the shared pool and then on backorder; any other reservation takes from the shared pool
  and then on backorder. A reservation only ever takes from its own fence and the shared pool, and taking
  from the shared pool leaves every fence as it was, so no channel ever eats into another's quota.
  Needs `num` from common.
]]

-- (shared units, the view of `channel` or nil): the view has fence, borrow and the field names to
-- change. `free` is the SKU's stock on hand not yet promised (on_hand_free in common).
local function channel_view(chan_key, count, free, channel)
  if count <= 0 then
    return free, nil
  end
  local raw = redis.call('HGETALL', chan_key)
  local by, list = {}, {}
  for i = 1, #raw, 2 do
    local field, value = raw[i], raw[i + 1]
    local name = string.sub(field, 3)
    local c = by[name]
    if not c then
      c = {name = name, q = 0, u = 0, p = 0, b = 0}
      by[name] = c
      list[#list + 1] = c
    end
    c[string.sub(field, 1, 1)] = tonumber(value)
  end
  table.sort(list, function(x, y)
    if x.p ~= y.p then
      return x.p > y.p
    end
    return x.name < y.name
  end)
  local rest = free
  for _, c in ipairs(list) do
    local fence = math.max(0, math.min(c.q - c.u, rest))
    c.fence = fence
    rest = rest - fence
  end
  return rest, by[channel]
end

-- How a line of `qty` units for `channel` ('' none) splits over the SKU's stock: units from the channel's
-- quota, units on backorder, and the units available to such a line (to report a refusal).
-- `s` is the SKU as read_sku reads it (with `channels`), `chan_key` its channels hash.
local function split_line(s, chan_key, channel, qty, now)
  local free = on_hand_free(s)
  local shared, view = channel_view(chan_key, s.channels, free, channel)
  local presale = presale_free(s, now)
  if view and view.b ~= 1 then
    return math.min(qty, view.fence), 0, view.fence  -- a channel that may not borrow has its quota only
  end
  local fence = view and view.fence or 0
  local from_quota = math.min(qty, fence)
  local bo = math.max(0, qty - from_quota - shared)
  return from_quota, bo, fence + shared + presale
end

-- Gives a line's quota units back to its reservation's channel (a hold released, expired or undone; a
-- direct sale reverted): the channel's `u:` shrinks and the part's `c:<sku>` goes.
local function drop_quota(chan_key, part, sku, channel)
  local units = num(redis.call('HGET', part, 'c:' .. sku))
  if units > 0 then
    redis.call('HINCRBY', chan_key, 'u:' .. channel, -units)
    redis.call('HDEL', part, 'c:' .. sku)
  end
end

-- Takes a line's quota units from `channel` (reserve, a direct deduction at confirm).
local function take_quota(chan_key, part, sku, channel, units)
  if units > 0 then
    redis.call('HINCRBY', chan_key, 'u:' .. channel, units)
    redis.call('HSET', part, 'c:' .. sku, units)
  end
end

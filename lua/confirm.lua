--[[
  Payment arrived: turns this shard's part of a reservation into a sale, all-or-nothing.

  - A held part (even one past its deadline that the sweeper has not reached yet, which is the same as
    expiring it and deducting the same units again) moves its held units to sold; its on_payment lines
    are deducted from available stock now.
  - An expired or pending part is confirmed only if every line is available *right now*, deducted
    directly with no new hold: paying after expiry never restarts a hold. A direct deduction takes
    stock on hand first (the reservation's channel's fence, then the shared pool), then what the SKU's
    open presale allows, on backorder (as reserve.lua does).
  - A line's backordered units stay backordered when it is sold: receipts fill them.
  - Confirming a confirmed part answers ALREADY; a released part is refused.

  Input (variable key count: 4 + 4 per line):
    KEYS[1]     the reservation's part on this shard     sh:{s}:res:<id>
    KEYS[2]     shard expiry index                       sh:{s}:expiry
    KEYS[3]     shard event stream                       sh:{s}:events
    KEYS[2+2i]  line i's SKU hash;  KEYS[3+2i] line i's per-user units hash
    KEYS[3+2n+i] line i's backorder queue                sh:{s}:boq:<tenant>:<sku>
    KEYS[3+3n+i] line i's channels                       sh:{s}:chan:<tenant>:<sku>
    KEYS[4+4n]  shard ready marker                       sh:{s}:ready (the last key)

    ARGV[1] reservation id
    ARGV[2] now, ms since the epoch
    ARGV[3] number of lines n
    ARGV[3+i] line i's sku

  Output:
    {0, 'confirmed', first, last}  events 'confirmed' (held -> sold) / 'sold' (available -> sold) per
                                 line; first and last are their stream ids, kept on the part as `ce`, so
                                 the caller can write exactly these events through to PostgreSQL
    {1, 'confirmed', first, last}  ALREADY confirmed (the ids of the events that confirmed it)
    {-5}                         RESERVATION_NOT_FOUND (no part here, or the lines do not match)
    {-6}                         RESERVATION_RELEASED
    {-3, i, limit, units}        LIMIT_EXCEEDED on a direct deduction
    {-2, i1, avail1, total1, ...} INSUFFICIENT_STOCK on a direct deduction (as reserve.lua)
    {-10}                        NOT_READY: the shard awaits a rebuild
]]
--@include common
--@include lines
--@include channels
--@include ready

if not shard_ready(KEYS[#KEYS]) then
  return {-10}
end
local part, expiry, stream = KEYS[1], KEYS[2], KEYS[3]
local id, now, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local head = redis.call('HMGET', part, 'st', 'u', 't', 'ce', 'ch')
local st, user, tenant, channel = head[1], head[2], head[3], head[5] or ''
if not st then
  return {-5}
end
if st == 'confirmed' then
  local first, last = string.match(head[4] or '', '^(%S+) (%S+)$')
  return {1, 'confirmed', first or '', last or ''}
end
if st == 'released' then
  return {-6}
end
local lines = read_lines(part, n, 4, 4)
if not lines then
  return {-5}
end

-- A held part keeps its held lines; anything else (expired, pending, on_payment lines) needs stock now.
local from_hold = st == 'held'
local short, limit_error = {}, nil
for i = 1, n do
  local l = lines[i]
  l.s = read_sku(l.sku_key)
  l.direct = not (from_hold and l.held)
  if l.direct then
    if l.s.limit > 0 and not limit_error then
      local units = num(redis.call('HGET', l.user_key, user))
      if units + l.qty > l.s.limit then
        limit_error = {-3, i, l.s.limit, units}
      end
    end
    local from_quota, bo, free = split_line(l.s, KEYS[3 + 3 * n + i], channel, l.qty, now)
    if l.qty > free then
      short[#short + 1] = i
      short[#short + 1] = free
      short[#short + 1] = available(l.s, now)
    end
    l.bo, l.lq = bo, from_quota
  else
    local kept = redis.call('HMGET', part, 'b:' .. l.sku, 'c:' .. l.sku)
    l.bo, l.lq = num(kept[1]), num(kept[2])
  end
end
if limit_error then
  return limit_error
end
if #short > 0 then
  table.insert(short, 1, -2)
  return short
end

local how = from_hold and 'h' or 'd'
local first, last
for i = 1, n do
  local l, s = lines[i], lines[i].s
  local av0, kind = available(s, now), 'confirmed'
  if l.direct then
    kind = 'sold'
    s.sold = redis.call('HINCRBY', l.sku_key, 'sold', l.qty)
    add_user_units(l.user_key, user, l.qty)
    if l.bo > 0 then
      s.bo = redis.call('HINCRBY', l.sku_key, 'backordered', l.bo)
      redis.call('ZADD', KEYS[3 + 2 * n + i], now, id)
      redis.call('HSET', part, 'b:' .. l.sku, l.bo)
    end
    take_quota(KEYS[3 + 3 * n + i], part, l.sku, channel, l.lq)
  else
    s.held = redis.call('HINCRBY', l.sku_key, 'held', -l.qty)
    s.sold = redis.call('HINCRBY', l.sku_key, 'sold', l.qty)
  end
  last = emit(stream, kind, tenant, l.sku, l.qty, id, user, s.on_hand, s.held, s.sold, s.bo, av0,
    available(s, now), now, 'st', 'confirmed', 'pst', st, 'cf', how, 'lbo', l.bo, 'lq', l.lq)
  first = first or last
end
redis.call('HSET', part, 'st', 'confirmed', 'pst', st, 'cf', how, 'ce', first .. ' ' .. last)
redis.call('ZREM', expiry, id)
return {0, 'confirmed', first, last}

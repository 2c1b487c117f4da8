--[[
  Payment arrived: turns this shard's part of a reservation into a sale, all-or-nothing.

  - A held part (even one past its deadline that the sweeper has not reached yet, which is the same as
    expiring it and deducting the same units again) moves its held units to sold; its on_payment lines
    are deducted from available stock now.
  - An expired or pending part is confirmed only if every line is available *right now*, deducted
    directly with no new hold: paying after expiry never restarts a hold.
  - Confirming a confirmed part answers ALREADY; a released part is refused.

  Input (variable key count: 4 + 2 per line):
    KEYS[1]     the reservation's part on this shard     sh:{s}:res:<id>
    KEYS[2]     shard expiry index                       sh:{s}:expiry
    KEYS[3]     shard event stream                       sh:{s}:events
    KEYS[2+2i]  line i's SKU hash;  KEYS[3+2i] line i's per-user units hash
    KEYS[4+2n]  shard ready marker                       sh:{s}:ready (the last key)

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
    {-2, i1, avail1, ...}        INSUFFICIENT_STOCK on a direct deduction
    {-10}                        NOT_READY: the shard awaits a rebuild
]]
--@include common
--@include lines
--@include ready

if not shard_ready(KEYS[#KEYS]) then
  return {-10}
end
local part, expiry, stream = KEYS[1], KEYS[2], KEYS[3]
local id, now, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local head = redis.call('HMGET', part, 'st', 'u', 't', 'ce')
local st, user, tenant = head[1], head[2], head[3]
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
    local free = available(l.s.on_hand, l.s.safety, l.s.held, l.s.sold)
    if l.qty > free then
      short[#short + 1] = i
      short[#short + 1] = free
    end
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
  local l = lines[i]
  local held, sold
  if l.direct then
    held = l.s.held
    sold = redis.call('HINCRBY', l.sku_key, 'sold', l.qty)
    add_user_units(l.user_key, user, l.qty)
    last = emit(stream, 'sold', tenant, l.sku, l.qty, id, user, l.s.on_hand, held, sold, now,
      'st', 'confirmed', 'pst', st, 'cf', how)
  else
    held = redis.call('HINCRBY', l.sku_key, 'held', -l.qty)
    sold = redis.call('HINCRBY', l.sku_key, 'sold', l.qty)
    last = emit(stream, 'confirmed', tenant, l.sku, l.qty, id, user, l.s.on_hand, held, sold, now,
      'st', 'confirmed', 'pst', st, 'cf', how)
  end
  first = first or last
end
redis.call('HSET', part, 'st', 'confirmed', 'pst', st, 'cf', how, 'ce', first .. ' ' .. last)
redis.call('ZREM', expiry, id)
return {0, 'confirmed', first, last}

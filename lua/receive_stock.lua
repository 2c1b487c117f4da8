--[[
  Goods arrived: books `qty` units into one SKU's on_hand and fills its backorders with them, oldest
  first, all in one step.

  A line reserved on backorder (reserve.lua, confirm.lua's direct deduction) waits in the SKU's backorder
  queue, oldest first, with its backordered units on its part as `b:<sku>`. A receipt fills
  min(qty, backordered) units: walking the queue from its head, each line's units become normal ones
  (its `b:<sku>` shrinks, the SKU's backordered count with it) until that many are filled; a line filled
  whole leaves the queue. What is left of the receipt is free stock on hand.

  The caller reads the head of the queue and passes its parts' keys (a script names every key it
  touches); this script checks that they are still the queue's head and cover the units to fill, and
  otherwise returns STALE having changed nothing, for the caller to read again and retry.

  The events report the availability before and after the whole receipt (av0, av) on 'received' and the
  final one on each 'filled', so a consumer never sees units on sale that the backorders take at once.

  Input (variable key count: 5 + m):
    KEYS[1]     SKU hash                      sh:{s}:sku:<tenant>:<sku>
    KEYS[2]     the SKU's backorder queue     sh:{s}:boq:<tenant>:<sku>
    KEYS[3]     shard event stream            sh:{s}:events
    KEYS[4]     idempotency record            (untouched when ARGV[6] is '')
    KEYS[4+j]   the part of the queue's j-th reservation, j = 1..m     sh:{s}:res:<id>
    KEYS[5+m]   shard ready marker            sh:{s}:ready (the last key)

    ARGV[1] tenant
    ARGV[2] sku
    ARGV[3] qty, integer >= 1
    ARGV[4] now, ms since the epoch
    ARGV[5] reason (free text, carried on the 'received' event)
    ARGV[6] idempotency fingerprint, '' for none
    ARGV[7] idempotency record TTL, seconds
    ARGV[8] m, the number of queued reservations passed
    ARGV[8+j] the j-th reservation id of the queue, as the caller read it

  Output:
    {0, on_hand, safety_stock, held, sold, mode, hold_ttl_seconds, per_user_limit, policy...,
     backordered, presale_cap, presale_eta, presale_ends_at, filled, lines}
                 the SKU's state after (as adjust_stock-4.lua answers it), the units filled and the
                 lines they belonged to; events 'received', then 'filled' per line, oldest first
    {-1}         SKU_NOT_FOUND
    {-8}         IDEMPOTENCY_CONFLICT
    {-10}        NOT_READY: the shard awaits a rebuild; nothing changed
    {-14, j}     STALE: the queue's head is not the reservations passed (from the j-th on), or they
                 cover too few units; nothing changed, nothing recorded under the idempotency key
]]
--@include common
--@include policy
--@include idempotency
--@include ready

if not shard_ready(KEYS[#KEYS]) then
  return {-10}
end
local replay = idem_replay(KEYS[4], ARGV[6])
if replay then
  return replay
end
local sku_key, queue, stream = KEYS[1], KEYS[2], KEYS[3]
local tenant, sku, qty, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local m = tonumber(ARGV[8])

local s = read_sku(sku_key)
if not s then
  idem_store(KEYS[4], ARGV[6], ARGV[7], {-1})
  return {-1}
end

-- Pass 1: the lines to fill, from the head of the queue; nothing is written before they are known.
local to_fill = math.min(qty, s.bo)
local head = {}
if m > 0 then
  head = redis.call('ZRANGE', queue, 0, m - 1)
end
local plan, planned, j = {}, 0, 1
while planned < to_fill do
  if j > m or head[j] ~= ARGV[8 + j] then
    return {-14, j}
  end
  local part = KEYS[4 + j]
  local units = num(redis.call('HGET', part, 'b:' .. sku))
  local take = math.min(units, to_fill - planned)
  plan[#plan + 1] = {part = part, id = ARGV[8 + j], units = units, take = take}
  planned = planned + take
  j = j + 1
end

-- Pass 2: apply.
local av0 = available(s, now)
s.on_hand = redis.call('HINCRBY', sku_key, 'on_hand', qty)
local final = {on_hand = s.on_hand, safety = s.safety, held = s.held, sold = s.sold, bo = s.bo - to_fill,
  cap = s.cap, ends = s.ends}
local av = available(final, now)
emit(stream, 'received', tenant, sku, qty, '', '', s.on_hand, s.held, s.sold, s.bo, av0, av, now,
  'reason', ARGV[5])
local lines = 0
for _, p in ipairs(plan) do
  local left = p.units - p.take
  if left > 0 then
    redis.call('HSET', p.part, 'b:' .. sku, left)
  else
    redis.call('HDEL', p.part, 'b:' .. sku)
    redis.call('ZREM', queue, p.id)
  end
  if p.take > 0 then
    s.bo = redis.call('HINCRBY', sku_key, 'backordered', -p.take)
    local part = redis.call('HMGET', p.part, 'st', 'u', 'pst', 'cf')
    if part[1] == 'confirmed' then
      emit(stream, 'filled', tenant, sku, p.take, p.id, part[2], s.on_hand, s.held, s.sold, s.bo, av, av, now,
        'st', part[1], 'pst', part[3], 'cf', part[4], 'lbo', left)
    else
      emit(stream, 'filled', tenant, sku, p.take, p.id, part[2], s.on_hand, s.held, s.sold, s.bo, av, av, now,
        'st', part[1], 'lbo', left)
    end
    lines = lines + 1
  end
end

local result = {0, s.on_hand, s.safety, s.held, s.sold, s.mode, s.ttl, s.limit}
for _, value in ipairs(policy_values(sku_key)) do
  result[#result + 1] = value
end
result[#result + 1] = s.bo
result[#result + 1] = s.cap
result[#result + 1] = num(redis.call('HGET', sku_key, 'presale_eta'))
result[#result + 1] = s.ends
result[#result + 1] = to_fill
result[#result + 1] = lines
idem_store(KEYS[4], ARGV[6], ARGV[7], result)
return result

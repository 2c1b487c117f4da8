--[[
  Restocks (delta > 0) or shrinks (delta < 0) one SKU's on_hand.

  A shrink that would leave less than is promised from stock on hand (held + sold - backordered, after
  safety_stock) is refused and changes nothing. A restock does not fill backorders: receipts do
  (receive_stock.lua).

  Input:
    KEYS[1] SKU hash                    sh:{s}:sku:<tenant>:<sku>
    KEYS[2] shard event stream          sh:{s}:events
    KEYS[3] idempotency record          (untouched when ARGV[6] is '')
    KEYS[4] shard ready marker          sh:{s}:ready

    ARGV[1] tenant
    ARGV[2] sku
    ARGV[3] delta, non-zero integer
    ARGV[4] now, ms since the epoch
    ARGV[5] reason (free text, carried on the event)
    ARGV[6] idempotency fingerprint, '' for none
    ARGV[7] idempotency record TTL, seconds

  Output:
    {0, on_hand, safety_stock, held, sold, mode, hold_ttl_seconds, per_user_limit, policy...,
     backordered, presale_cap, presale_eta, presale_ends_at}
                       event 'adjusted'; policy: the 7 fields of app/stock/policy.py POLICY_FIELDS
    {-1}               SKU_NOT_FOUND
    {-4, held, sold, backordered, 'on_hand'}  STOCK_CONFLICT: the shrink would go below held + sold -
                       backordered
    {-8}               IDEMPOTENCY_CONFLICT
    {-10}              NOT_READY: the shard awaits a rebuild; nothing changed
]]
--@include common
--@include policy
--@include idempotency
--@include ready

if not shard_ready(KEYS[4]) then
  return {-10}
end
local replay = idem_replay(KEYS[3], ARGV[6])
if replay then
  return replay
end

local delta, now = tonumber(ARGV[3]), tonumber(ARGV[4])
local s = read_sku(KEYS[1])
local result
if not s then
  result = {-1}
elseif s.on_hand + delta - s.safety < from_on_hand(s) then
  result = {-4, s.held, s.sold, s.bo, 'on_hand'}
else
  local av0 = available(s, now)
  s.on_hand = redis.call('HINCRBY', KEYS[1], 'on_hand', delta)
  emit(KEYS[2], 'adjusted', ARGV[1], ARGV[2], delta, '', '', s.on_hand, s.held, s.sold, s.bo, av0,
    available(s, now), ARGV[4], 'reason', ARGV[5])
  result = {0, s.on_hand, s.safety, s.held, s.sold, s.mode, s.ttl, s.limit}
  for _, value in ipairs(policy_values(KEYS[1])) do
    result[#result + 1] = value
  end
  result[#result + 1] = s.bo
  result[#result + 1] = s.cap
  result[#result + 1] = num(redis.call('HGET', KEYS[1], 'presale_eta'))
  result[#result + 1] = s.ends
end
idem_store(KEYS[3], ARGV[6], ARGV[7], result)
return result

--[[
  Restocks (delta > 0) or shrinks (delta < 0) one SKU's on_hand.

  A shrink that would leave less than held + sold (after safety_stock) is refused and changes nothing.

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
    {0, on_hand, safety_stock, held, sold, mode, hold_ttl_seconds, per_user_limit, policy...}
                       event 'adjusted'; policy: the 7 fields of app/stock/policy.py POLICY_FIELDS
    {-1}               SKU_NOT_FOUND
    {-4, held, sold}   STOCK_CONFLICT: the shrink would go below held + sold
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

local delta = tonumber(ARGV[3])
local s = read_sku(KEYS[1])
local result
if not s then
  result = {-1}
elseif s.on_hand + delta - s.safety < s.held + s.sold then
  result = {-4, s.held, s.sold}
else
  local on_hand = redis.call('HINCRBY', KEYS[1], 'on_hand', delta)
  emit(KEYS[2], 'adjusted', ARGV[1], ARGV[2], delta, '', '', on_hand, s.held, s.sold, ARGV[4],
    'reason', ARGV[5])
  result = {0, on_hand, s.safety, s.held, s.sold, s.mode, s.ttl, s.limit}
  for _, value in ipairs(policy_values(KEYS[1])) do
    result[#result + 1] = value
  end
end
idem_store(KEYS[3], ARGV[6], ARGV[7], result)
return result

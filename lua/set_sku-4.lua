--[[
  Creates or updates one SKU's stock and settings.

  Refuses (changing nothing) when the new settings would break invariant 1 for the units already
  promised: on_hand - safety_stock below what is promised from stock on hand (held + sold - backordered),
  or a presale cap below the units already backordered (0, presale off, included).

  Input:
    KEYS[1] SKU hash                    sh:{s}:sku:<tenant>:<sku>
    KEYS[2] shard event stream          sh:{s}:events
    KEYS[3] idempotency record          sh:{s}:idem:<tenant>:<digest> (untouched when ARGV[9] is '')
    KEYS[4] shard ready marker          sh:{s}:ready

    ARGV[1] tenant
    ARGV[2] sku
    ARGV[3] on_hand, integer >= 0
    ARGV[4] safety_stock, integer >= 0
    ARGV[5] mode: pre_reserve | on_order | on_payment
    ARGV[6] hold_ttl_seconds, 1..86400
    ARGV[7] per_user_limit, integer >= 1, or 0 for no limit
    ARGV[8] now, ms since the epoch (caller's clock, as for every script)
    ARGV[9] idempotency fingerprint, '' when the request carried no Idempotency-Key
    ARGV[10] idempotency record TTL, seconds
    ARGV[11..17] the purchase policy, integers, 0 = rule off (app/stock/policy.py POLICY_FIELDS):
            max_per_order, min_account_age_days, min_orders, min_member_days, cooldown_after_lapses,
            cooldown_within_minutes, cooldown_minutes
    ARGV[18] presale cap: units that may be promised on backorder at once, 0 = no presale
    ARGV[19] presale ETA, ms since the epoch (0 without presale)
    ARGV[20] presale end, ms since the epoch: no new backorder from then on; 0 = none

  Output:
    {1 | 0, on_hand, safety_stock, held, sold, mode, hold_ttl_seconds, per_user_limit, policy...,
     backordered, presale_cap, presale_eta, presale_ends_at}
        1 when the SKU was created, 0 when updated; policy is ARGV[11..17]. Event 'sku_set' with every
        setting, the policy's and the presale's fields included.
    {-4, held, sold, backordered, what}  STOCK_CONFLICT: what = 'on_hand' (on_hand - safety_stock would
                       fall below held + sold - backordered) or 'presale_cap' (the cap would fall below
                       backordered)
    {-8}               IDEMPOTENCY_CONFLICT: the key was used with another request
    {-10}              NOT_READY: the shard awaits a rebuild; nothing changed
    A replayed key returns the first result unchanged.
]]
--@include common
--@include idempotency
--@include ready

if not shard_ready(KEYS[4]) then
  return {-10}
end
local replay = idem_replay(KEYS[3], ARGV[9])
if replay then
  return replay
end

local on_hand, safety, now = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[8])
local cap, eta, ends = tonumber(ARGV[18]) or 0, tonumber(ARGV[19]) or 0, tonumber(ARGV[20]) or 0
local current = read_sku(KEYS[1])
local created, av0 = 1, 0
local s = {on_hand = on_hand, safety = safety, held = 0, sold = 0, bo = 0, cap = cap, ends = ends}
if current then
  created, av0 = 0, available(current, now)
  s.held, s.sold, s.bo = current.held, current.sold, current.bo
end

local result
if on_hand - safety < from_on_hand(s) then
  result = {-4, s.held, s.sold, s.bo, 'on_hand'}
elseif cap < s.bo then
  result = {-4, s.held, s.sold, s.bo, 'presale_cap'}
else
  redis.call('HSET', KEYS[1], 'on_hand', on_hand, 'safety_stock', safety, 'held', s.held, 'sold', s.sold,
    'backordered', s.bo, 'mode', ARGV[5], 'hold_ttl_seconds', ARGV[6], 'per_user_limit', ARGV[7],
    'max_per_order', ARGV[11], 'min_account_age_days', ARGV[12], 'min_orders', ARGV[13],
    'min_member_days', ARGV[14], 'cooldown_after_lapses', ARGV[15], 'cooldown_within_minutes', ARGV[16],
    'cooldown_minutes', ARGV[17], 'presale_cap', cap, 'presale_eta', eta, 'presale_ends_at', ends)
  emit(KEYS[2], 'sku_set', ARGV[1], ARGV[2], on_hand - (current and current.on_hand or 0), '', '',
    on_hand, s.held, s.sold, s.bo, av0, available(s, now), ARGV[8], 'safety_stock', safety, 'mode', ARGV[5],
    'hold_ttl_seconds', ARGV[6], 'per_user_limit', ARGV[7], 'max_per_order', ARGV[11],
    'min_account_age_days', ARGV[12], 'min_orders', ARGV[13], 'min_member_days', ARGV[14],
    'cooldown_after_lapses', ARGV[15], 'cooldown_within_minutes', ARGV[16], 'cooldown_minutes', ARGV[17],
    'presale_cap', cap, 'presale_eta', eta, 'presale_ends_at', ends)
  result = {created, on_hand, safety, s.held, s.sold, ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])}
  for i = 11, 17 do
    result[#result + 1] = tonumber(ARGV[i])
  end
  result[#result + 1] = s.bo
  result[#result + 1] = cap
  result[#result + 1] = eta
  result[#result + 1] = ends
end
idem_store(KEYS[3], ARGV[9], ARGV[10], result)
return result

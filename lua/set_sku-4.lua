--[[
  Creates or updates one SKU's stock and settings.

  Refuses (changing nothing) when the new on_hand and safety_stock would leave less than held + sold:
  invariant 1 (held + sold <= on_hand - safety_stock) must hold after every change.

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

  Output:
    {1 | 0, on_hand, safety_stock, held, sold, mode, hold_ttl_seconds, per_user_limit, policy...}
        1 when the SKU was created, 0 when updated; policy is ARGV[11..17]. Event 'sku_set' with every
        setting, the policy's fields included.
    {-4, held, sold}   STOCK_CONFLICT: on_hand - safety_stock would fall below held + sold
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

local on_hand, safety = tonumber(ARGV[3]), tonumber(ARGV[4])
local current = read_sku(KEYS[1])
local created, held, sold = 1, 0, 0
if current then
  created, held, sold = 0, current.held, current.sold
end

local result
if on_hand - safety < held + sold then
  result = {-4, held, sold}
else
  redis.call('HSET', KEYS[1], 'on_hand', on_hand, 'safety_stock', safety, 'held', held, 'sold', sold,
    'mode', ARGV[5], 'hold_ttl_seconds', ARGV[6], 'per_user_limit', ARGV[7], 'max_per_order', ARGV[11],
    'min_account_age_days', ARGV[12], 'min_orders', ARGV[13], 'min_member_days', ARGV[14],
    'cooldown_after_lapses', ARGV[15], 'cooldown_within_minutes', ARGV[16], 'cooldown_minutes', ARGV[17])
  emit(KEYS[2], 'sku_set', ARGV[1], ARGV[2], on_hand - (current and current.on_hand or 0), '', '',
    on_hand, held, sold, ARGV[8], 'safety_stock', safety, 'mode', ARGV[5], 'hold_ttl_seconds', ARGV[6],
    'per_user_limit', ARGV[7], 'max_per_order', ARGV[11], 'min_account_age_days', ARGV[12],
    'min_orders', ARGV[13], 'min_member_days', ARGV[14], 'cooldown_after_lapses', ARGV[15],
    'cooldown_within_minutes', ARGV[16], 'cooldown_minutes', ARGV[17])
  result = {created, on_hand, safety, held, sold, ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])}
  for i = 11, 17 do
    result[#result + 1] = tonumber(ARGV[i])
  end
end
idem_store(KEYS[3], ARGV[9], ARGV[10], result)
return result

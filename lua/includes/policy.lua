--[[
  A SKU's purchase policy (app/stock/policy.py): its rules live as flat fields of the SKU hash, 0 = off.
  reserve.lua reads them with the counters and checks every line before writing anything; release.lua
  and expire_holds.lua write the hoarding record when a held line of a SKU with a cooldown lapses.

  Hoarding record: one hash per SKU (sh:{s}:lapses:<tenant>:<sku>), field user ->
  "<until>:<t1>,<t2>,..." where until is the end of the user's cooldown (ms since the epoch, 0 = none)
  and t are the times (ms) of the user's lapses inside the window. The hash expires once the longer of
  the window and the cooldown has passed with no new lapse, so no user is kept longer than the rule needs.
  Needs `num` from common.
]]

-- The counters, settings and policy of one SKU hash: nil when the SKU does not exist.
local function read_sku_with_policy(key)
  local v = redis.call('HMGET', key, 'on_hand', 'safety_stock', 'held', 'sold', 'mode',
    'hold_ttl_seconds', 'per_user_limit', 'max_per_order', 'min_account_age_days', 'min_orders',
    'min_member_days', 'cooldown_after_lapses', 'backordered', 'presale_cap', 'presale_ends_at', 'channels')
  if not v[1] then
    return nil
  end
  return {
    on_hand = num(v[1]), safety = num(v[2]), held = num(v[3]), sold = num(v[4]),
    mode = v[5], ttl = num(v[6]), limit = num(v[7]), max_order = num(v[8]),
    min_age = num(v[9]), min_orders = num(v[10]), min_member = num(v[11]), cooldown = num(v[12]),
    bo = num(v[13]), cap = num(v[14]), ends = num(v[15]), channels = num(v[16]),
  }
end

-- The policy's fields as numbers, in app/stock/policy.py POLICY_FIELDS order (0 = rule off).
local function policy_values(key)
  local v = redis.call('HMGET', key, 'max_per_order', 'min_account_age_days', 'min_orders',
    'min_member_days', 'cooldown_after_lapses', 'cooldown_within_minutes', 'cooldown_minutes')
  for i = 1, 7 do
    v[i] = num(v[i])
  end
  return v
end

-- The first eligibility rule the buyer fails, as (rule, required minimum, the buyer's fact or '' when
-- the checkout did not send it); nil when every rule passes. A fact not sent fails every rule needing it.
local function failed_rule(s, age, orders, member)
  if s.min_age > 0 and (not age or age < s.min_age) then
    return 'min_account_age_days', s.min_age, age or ''
  end
  if s.min_orders > 0 and (not orders or orders < s.min_orders) then
    return 'min_orders', s.min_orders, orders or ''
  end
  if s.min_member > 0 and (not member or member < s.min_member) then
    return 'min_member_days', s.min_member, member or ''
  end
  return nil
end

-- When the user's cooldown on this SKU ends (ms), or 0 when they have none at `now`.
local function cooldown_until(lapse_key, user, now)
  local record = redis.call('HGET', lapse_key, user)
  if not record then
    return 0
  end
  local ends = tonumber(string.match(record, '^(%d+):'))
  if ends and ends > now then
    return ends
  end
  return 0
end

-- One of the user's holds on the SKU lapsed (released or expired) at `now`: counts it in the window and
-- starts the cooldown when it is the K-th. Nothing to do for a SKU without a cooldown rule.
-- Times stay strings: tostring() of a large number in Redis's Lua gives "1.7e+12".
local function record_lapse(sku_key, lapse_key, user, now)
  local rule = redis.call('HMGET', sku_key, 'cooldown_after_lapses', 'cooldown_within_minutes',
    'cooldown_minutes')
  local k = num(rule[1])
  if k == 0 then
    return
  end
  local window, pause = num(rule[2]) * 60000, num(rule[3]) * 60000
  local record = redis.call('HGET', lapse_key, user)
  local ends, times = 0, {}
  if record then
    local head, list = string.match(record, '^(%d+):(.*)$')
    ends = tonumber(head) or 0
    for t in string.gmatch(list or '', '%d+') do
      if tonumber(t) > now - window then
        times[#times + 1] = t
      end
    end
  end
  times[#times + 1] = string.format('%d', now)
  if #times >= k then
    ends = math.max(ends, now + pause)
    times = {}
  end
  redis.call('HSET', lapse_key, user, string.format('%d', ends) .. ':' .. table.concat(times, ','))
  local keep = math.max(window, pause)
  if redis.call('PTTL', lapse_key) < keep then
    redis.call('PEXPIRE', lapse_key, keep)
  end
end

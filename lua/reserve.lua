--[[
  Reserves every line of one reservation that lives on this shard, all-or-nothing.

  Checks every line first (SKU exists, the SKU's purchase policy: max_per_order, eligibility, hold
  cooldown, per-user limit; then stock), then applies them all: a refused call changes nothing. A line
  whose SKU is in mode on_payment holds nothing (it is deducted at confirm); pre_reserve and on_order
  lines are held. A held line takes stock on hand first; what on hand cannot cover it takes on backorder,
  within the SKU's open presale (cap less the units already backordered): those units are counted in the
  SKU's `backordered`, kept on the part as `b:<sku>` and queued (oldest first) for receipts to fill.
  With a channel (ARGV[11+2n]) that has a quota on the SKU, a line takes from the channel's fence first,
  then, if the channel may borrow, as any other line does (includes/channels.lua); the units taken from
  the quota count as the channel's `u:` and are kept on the part as `c:<sku>`, the channel as `ch`.
  Re-running with an id that already has a part here returns ALREADY and changes nothing, which makes
  retries after a crash safe.

  Input (variable key count: 4 + 5 per line):
    KEYS[1]       this reservation's part on the shard   sh:{s}:res:<id>
    KEYS[2]       shard expiry index                     sh:{s}:expiry
    KEYS[3]       shard event stream                     sh:{s}:events
    KEYS[2+2i]    line i's SKU hash                      sh:{s}:sku:<tenant>:<sku>
    KEYS[3+2i]    line i's per-user units hash           sh:{s}:usr:<tenant>:<sku>
    KEYS[3+2n+i]  line i's hoarding record (read only)   sh:{s}:lapses:<tenant>:<sku>
    KEYS[3+3n+i]  line i's backorder queue               sh:{s}:boq:<tenant>:<sku>
    KEYS[3+4n+i]  line i's channels                      sh:{s}:chan:<tenant>:<sku>
    KEYS[4+5n]    shard ready marker (the last key)      sh:{s}:ready

    ARGV[1] reservation id
    ARGV[2] tenant
    ARGV[3] user id
    ARGV[4] now, ms since the epoch
    ARGV[5] shared deadline: '' for none. A reservation spanning shards passes the deadline it computed
            for all its parts (ms since the epoch, 0 = none); the part takes the earlier of it and its
            own (now + the shortest hold_ttl_seconds of its pre_reserve lines), so a SKU switched to
            pre_reserve since the caller read it still gets a deadline
    ARGV[6] reservation document (JSON) stored on the home part, '' on the other parts
    ARGV[7] number of lines n (1..50)
    ARGV[6+2i] line i's sku;  ARGV[7+2i] line i's quantity (1..1000)
    ARGV[8+2n], ARGV[9+2n], ARGV[10+2n]  the buyer's account_age_days, orders_count, member_days
            ('' when the checkout did not send it), for eligibility rules
    ARGV[11+2n] the reservation's channel, '' for none

  Output:
    {0, status, deadline, b1, eta1, ..., bn, etan}
                                 status 'held' or 'pending' (every line on_payment); events 'held' /
                                 'pending' per line; deadline in ms, 0 for none; bi the units of line i
                                 taken on backorder and etai its SKU's presale ETA (ms; 0 when bi = 0)
    {1, status, deadline}        ALREADY: the part exists (status is its current one)
    {-1, i}                      SKU_NOT_FOUND: line i
    {-3, i, limit, units}        LIMIT_EXCEEDED: line i; the user already has `units` of `limit`
    {-13, i, max}                ORDER_LIMIT: line i asks for more than the SKU's max_per_order
    {-11, i, rule, min, fact}    NOT_ELIGIBLE: line i's SKU requires `rule` >= min; the buyer's fact
                                 ('' when not sent)
    {-12, i, until}              HOLD_COOLDOWN: the user's holds on line i's SKU lapsed too often; no
                                 new hold before `until` (ms)
                                 Policy refusals come before stock; the first refused line wins.
    {-2, i1, avail1, total1, i2, ...}
                                 INSUFFICIENT_STOCK: each short line with the units available to it
                                 (its channel's fence, the shared pool, on backorder) and to anyone at
                                 all (every fence included: 0 means sold out for every channel)
    {-9, i}                      DUPLICATE_LINE: line i names a SKU an earlier line named (lines must be
                                 distinct; the API refuses such requests before they get here)
    {-10}                        NOT_READY: the shard awaits a rebuild; nothing changed
]]
--@include common
--@include policy
--@include channels
--@include ready

if not shard_ready(KEYS[#KEYS]) then
  return {-10}
end
local part, expiry, stream = KEYS[1], KEYS[2], KEYS[3]
local id, tenant, user, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local n = tonumber(ARGV[7])
local age, orders, member = tonumber(ARGV[8 + 2 * n]), tonumber(ARGV[9 + 2 * n]), tonumber(ARGV[10 + 2 * n])
local channel = ARGV[11 + 2 * n] or ''

if redis.call('EXISTS', part) == 1 then
  local st = redis.call('HMGET', part, 'st', 'exp')
  return {1, st[1], num(st[2])}
end

-- Pass 1: check every line; nothing is written until all of them pass.
local lines, short, refusal, seen = {}, {}, nil, {}
for i = 1, n do
  local sku_key, user_key = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local sku, qty = ARGV[6 + 2 * i], tonumber(ARGV[7 + 2 * i])
  if seen[sku] then
    return {-9, i}
  end
  seen[sku] = true
  local s = read_sku_with_policy(sku_key)
  if not s then
    return {-1, i}
  end
  if not refusal then
    if s.max_order > 0 and qty > s.max_order then
      refusal = {-13, i, s.max_order}
    else
      local rule, minimum, fact = failed_rule(s, age, orders, member)
      if rule then
        refusal = {-11, i, rule, minimum, fact}
      end
    end
  end
  if not refusal and s.cooldown > 0 then
    local ends = cooldown_until(KEYS[3 + 2 * n + i], user, now)
    if ends > 0 then
      refusal = {-12, i, ends}
    end
  end
  if not refusal and s.limit > 0 then
    local units = num(redis.call('HGET', user_key, user))
    if units + qty > s.limit then
      refusal = {-3, i, s.limit, units}
    end
  end
  local from_quota, bo, free = split_line(s, KEYS[3 + 4 * n + i], channel, qty, now)
  if qty > free then
    short[#short + 1] = i
    short[#short + 1] = free
    short[#short + 1] = available(s, now)
  end
  if s.mode == 'on_payment' then
    from_quota, bo = 0, 0  -- holds nothing now: confirm deducts it
  end
  lines[i] = {sku_key = sku_key, user_key = user_key, sku = sku, qty = qty, s = s, bo = bo, lq = from_quota}
end
if refusal then
  return refusal
end
if #short > 0 then
  table.insert(short, 1, -2)
  return short
end

-- Pass 2: apply. Arguments go to redis.call directly rather than through tables: building tables and
-- strings is most of what this script costs Redis (measured), and this is the hottest script there is.
local status, deadline = 'pending', 0
for i = 1, n do
  local l = lines[i]
  if l.s.mode ~= 'on_payment' then
    status = 'held'
    if l.s.mode == 'pre_reserve' then
      local line_deadline = now + l.s.ttl * 1000
      if deadline == 0 or line_deadline < deadline then
        deadline = line_deadline
      end
    end
  end
end
local shared = tonumber(ARGV[5]) or 0
if shared > 0 and (deadline == 0 or shared < deadline) then
  deadline = shared
end

local doc = ARGV[6]  -- '' on a part that is not the reservation's home
local reply = {0, status, deadline}
for i = 1, n do
  local l, s = lines[i], lines[i].s
  local kind, av0, eta = 'pending', available(s, now), 0
  if s.mode ~= 'on_payment' then
    kind = 'held'
    s.held = redis.call('HINCRBY', l.sku_key, 'held', l.qty)
    add_user_units(l.user_key, user, l.qty)
    if l.bo > 0 then
      s.bo = redis.call('HINCRBY', l.sku_key, 'backordered', l.bo)
      redis.call('ZADD', KEYS[3 + 3 * n + i], now, id)
      eta = num(redis.call('HGET', l.sku_key, 'presale_eta'))
    end
  end
  take_quota(KEYS[3 + 4 * n + i], part, l.sku, channel, l.lq)
  if i == 1 and doc ~= '' then
    emit(stream, kind, tenant, l.sku, l.qty, id, user, s.on_hand, s.held, s.sold, s.bo, av0, available(s, now),
      now, 'st', status, 'exp', deadline, 'lbo', l.bo, 'lq', l.lq, 'doc', doc)
  else
    emit(stream, kind, tenant, l.sku, l.qty, id, user, s.on_hand, s.held, s.sold, s.bo, av0, available(s, now),
      now, 'st', status, 'exp', deadline, 'lbo', l.bo, 'lq', l.lq)
  end
  reply[#reply + 1] = l.bo
  reply[#reply + 1] = eta
end
local first = lines[1]
local first_held = first.s.mode ~= 'on_payment' and 1 or 0
if doc ~= '' then
  redis.call('HSET', part, 'st', status, 'u', user, 't', tenant, 'exp', deadline, 'c', now, 'n', n,
    'q:' .. first.sku, first.qty, 'h:' .. first.sku, first_held, 'doc', doc)
else
  redis.call('HSET', part, 'st', status, 'u', user, 't', tenant, 'exp', deadline, 'c', now, 'n', n,
    'q:' .. first.sku, first.qty, 'h:' .. first.sku, first_held)
end
for i = 2, n do
  local l = lines[i]
  redis.call('HSET', part, 'q:' .. l.sku, l.qty, 'h:' .. l.sku, l.s.mode ~= 'on_payment' and 1 or 0)
end
for i = 1, n do
  if lines[i].bo > 0 then
    redis.call('HSET', part, 'b:' .. lines[i].sku, lines[i].bo)
  end
end
if channel ~= '' then
  redis.call('HSET', part, 'ch', channel)
end
if deadline > 0 then
  -- a pending part (only on_payment lines) of a reservation that has a deadline expires with it,
  -- so the whole reservation is expired at once: releasing it then changes nothing anywhere
  redis.call('ZADD', expiry, deadline, id)
end
return reply

--[[
  The sweeper's step: expires a batch of this shard's due reservation parts, returning their held
  units. A part is due when its deadline has passed and it is still held, or pending (a part with only
  on_payment lines, holding nothing, of a reservation spanning shards that has a deadline).

  The caller picks due ids from the expiry index and reads their lines; this script re-checks each
  part under the script's atomicity (still held, deadline passed) so a hold confirmed or released in
  between, or expired by another sweeper, is left alone. Index entries whose part is gone or no longer
  held are removed. The batch size bounds how long one call blocks Redis.

  An expired held line's quota units go back to its reservation's channel.
  An expired held line's backordered units leave the SKU's backordered count and its backorder queue.
  An expired held line of a SKU with a hold cooldown counts as a lapse of the user's
  (includes/policy.lua).

  Input (variable key count: 2 + per reservation (1 + 5 per line) + 1):
    KEYS[1]   shard expiry index              sh:{s}:expiry
    KEYS[2]   shard event stream              sh:{s}:events
    then, per reservation r in ARGV order: its part key, then each line's SKU hash and per-user hash,
              then each line's hoarding record (sh:{s}:lapses:<tenant>:<sku>), then each line's
              backorder queue (sh:{s}:boq:<tenant>:<sku>), then each line's channels
              (sh:{s}:chan:<tenant>:<sku>)
    last      shard ready marker              sh:{s}:ready

    ARGV[1]   now, ms since the epoch
    ARGV[2]   number of reservations r
    then, per reservation: its id, its number of lines n, then n skus (same order as its KEYS)

  Output:
    {expired, skipped}   parts expired (events 'expired' per held line, 'lapsed' per line that held
                         nothing) and index entries skipped or dropped
    {-10}                NOT_READY: the shard awaits a rebuild
]]
--@include common
--@include policy
--@include channels
--@include ready

if not shard_ready(KEYS[#KEYS]) then
  return {-10}
end
local expiry, stream = KEYS[1], KEYS[2]
local now, count = tonumber(ARGV[1]), tonumber(ARGV[2])
local a, k = 3, 3
local expired, skipped = 0, 0

for _ = 1, count do
  local id, n = ARGV[a], tonumber(ARGV[a + 1])
  local part = KEYS[k]
  local head = redis.call('HMGET', part, 'st', 'u', 't', 'exp', 'n', 'ch')
  local st, user, tenant, deadline = head[1], head[2], head[3], num(head[4])
  local live = st == 'held' or st == 'pending'
  if live and num(head[5]) ~= n then
    -- the caller's view of this part is stale: leave it for the next sweep, which reads it afresh
    skipped = skipped + 1
  elseif live and deadline > 0 and deadline <= now then
    for i = 1, n do
      local sku = ARGV[a + 1 + i]
      local sku_key, user_key = KEYS[k + 2 * i - 1], KEYS[k + 2 * i]
      local line = redis.call('HMGET', part, 'q:' .. sku, 'h:' .. sku, 'b:' .. sku)
      local qty = tonumber(line[1])
      local s = read_sku(sku_key)
      local av0 = available(s, now)
      if st == 'held' and line[2] == '1' then
        s.held = redis.call('HINCRBY', sku_key, 'held', -qty)
        add_user_units(user_key, user, -qty)
        s.bo = drop_backorder(sku_key, KEYS[k + 3 * n + i], part, sku, id, num(line[3])) or s.bo
        drop_quota(KEYS[k + 4 * n + i], part, sku, head[6] or '')
        emit(stream, 'expired', tenant, sku, qty, id, user, s.on_hand, s.held, s.sold, s.bo, av0,
          available(s, now), now, 'st', 'expired', 'lbo', 0)
        record_lapse(sku_key, KEYS[k + 2 * n + i], user, now)
      else
        emit(stream, 'lapsed', tenant, sku, qty, id, user, s.on_hand, s.held, s.sold, s.bo, av0, av0, now,
          'st', 'expired', 'lbo', 0)
      end
    end
    redis.call('HSET', part, 'st', 'expired')
    redis.call('ZREM', expiry, id)
    expired = expired + 1
  elseif not live then
    redis.call('ZREM', expiry, id)
    skipped = skipped + 1
  else
    skipped = skipped + 1
  end
  a = a + 2 + n
  k = k + 1 + 5 * n
end
return {expired, skipped}

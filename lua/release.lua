--[[
  The buyer or checkout cancels: this shard's part of a reservation gives its held units back.

  Idempotent: releasing a released or expired part changes nothing. A confirmed part is refused. With
  ARGV[4] = 'undo' the part is deleted instead of marked released: that is the compensation for a
  reservation spanning shards whose reserve failed on a later shard, leaving this shard exactly as it
  was before the reserve (counters, per-user units, expiry index).

  A released held line's quota units go back to its reservation's channel (includes/channels.lua).
  A released held line's backordered units leave the SKU's backordered count and its backorder queue.

  A released held line of a SKU with a hold cooldown counts as a lapse of the user's (includes/policy.lua);
  an undo does not (the user never had the hold).

  Input (variable key count: 4 + 5 per line):
    KEYS[1]     the reservation's part on this shard     sh:{s}:res:<id>
    KEYS[2]     shard expiry index                       sh:{s}:expiry
    KEYS[3]     shard event stream                       sh:{s}:events
    KEYS[2+2i]  line i's SKU hash;  KEYS[3+2i] line i's per-user units hash
    KEYS[3+2n+i] line i's hoarding record                sh:{s}:lapses:<tenant>:<sku>
    KEYS[3+3n+i] line i's backorder queue                sh:{s}:boq:<tenant>:<sku>
    KEYS[3+4n+i] line i's channels                       sh:{s}:chan:<tenant>:<sku>
    KEYS[4+5n]  shard ready marker                       sh:{s}:ready (the last key)

    ARGV[1] reservation id
    ARGV[2] now, ms since the epoch
    ARGV[3] number of lines n
    ARGV[4] 'release' or 'undo'
    ARGV[4+i] line i's sku

  Output:
    {0, status}    'released' (or 'undone'); events 'released' / 'undone' per held line, 'cancelled'
                   per line that held nothing
    {1, status}    ALREADY: the part was released or expired; nothing changed
    {-5}           RESERVATION_NOT_FOUND
    {-7}           RESERVATION_CONFIRMED
    {-10}          NOT_READY: the shard awaits a rebuild
]]
--@include common
--@include lines
--@include policy
--@include channels
--@include ready

if not shard_ready(KEYS[#KEYS]) then
  return {-10}
end
local part, expiry, stream = KEYS[1], KEYS[2], KEYS[3]
local id, now, n, how = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]

local head = redis.call('HMGET', part, 'st', 'u', 't', 'ch')
local st, user, tenant, channel = head[1], head[2], head[3], head[4] or ''
if not st then
  return {-5}
end
if st == 'confirmed' then
  return {-7}
end
if (st == 'released' or st == 'expired') and how ~= 'undo' then
  return {1, st}
end
local lines = read_lines(part, n, 5, 4)
if not lines then
  return {-5}
end

local kind = how == 'undo' and 'undone' or 'released'
for i = 1, n do
  local l = lines[i]
  local s = read_sku(l.sku_key)
  local av0 = available(s, now)
  if st == 'held' and l.held then
    s.held = redis.call('HINCRBY', l.sku_key, 'held', -l.qty)
    add_user_units(l.user_key, user, -l.qty)
    local bo = num(redis.call('HGET', part, 'b:' .. l.sku))
    s.bo = drop_backorder(l.sku_key, KEYS[3 + 3 * n + i], part, l.sku, id, bo) or s.bo
    drop_quota(KEYS[3 + 4 * n + i], part, l.sku, channel)
    emit(stream, kind, tenant, l.sku, l.qty, id, user, s.on_hand, s.held, s.sold, s.bo, av0, available(s, now),
      now, 'st', kind, 'lbo', 0)
    if how ~= 'undo' then
      record_lapse(l.sku_key, KEYS[3 + 2 * n + i], user, now)
    end
  else
    -- the line held nothing (on_payment, or the part was pending or expired): no counter moves
    emit(stream, 'cancelled', tenant, l.sku, l.qty, id, user, s.on_hand, s.held, s.sold, s.bo, av0, av0, now,
      'st', kind, 'lbo', 0)
  end
end
redis.call('ZREM', expiry, id)
if how == 'undo' then
  redis.call('DEL', part)
else
  redis.call('HSET', part, 'st', 'released')
end
return {0, kind}

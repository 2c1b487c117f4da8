--[[
  Compensation for a reservation spanning shards whose confirm failed on a later shard: undoes this
  shard's confirm exactly, leaving counters and per-user units as they were before it.

  A part confirmed from a hold goes back to held (re-entering the expiry index; the sweeper expires it
  if its deadline has passed; its backordered units stay backordered). A part confirmed by direct
  deduction goes back to its previous status (expired or pending) and returns the units, those it took
  on backorder included, and its quota units to its channel.

  Input (variable key count: 4 + 4 per line, the ready marker last): as confirm.lua.
    ARGV[1] reservation id; ARGV[2] now (ms); ARGV[3] number of lines n; ARGV[3+i] line i's sku

  Output:
    {0, status}     the restored status; events 'unconfirmed' (back to held) or 'unsold' (a direct
                    deduction returned) per line
    {1, status}     nothing to revert (the part is not confirmed)
    {-5}            RESERVATION_NOT_FOUND
    {-10}           NOT_READY: the shard awaits a rebuild
]]
--@include common
--@include lines
--@include channels
--@include ready

if not shard_ready(KEYS[#KEYS]) then
  return {-10}
end
local part, expiry, stream = KEYS[1], KEYS[2], KEYS[3]
local id, now, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local head = redis.call('HMGET', part, 'st', 'u', 't', 'pst', 'cf', 'exp', 'ch')
local st, user, tenant, previous, how, deadline = head[1], head[2], head[3], head[4], head[5], num(head[6])
local channel = head[7] or ''
if not st then
  return {-5}
end
if st ~= 'confirmed' then
  return {1, st}
end
local lines = read_lines(part, n, 4, 4)
if not lines then
  return {-5}
end

for i = 1, n do
  local l = lines[i]
  local s = read_sku(l.sku_key)
  local av0 = available(s, now)
  local bo = num(redis.call('HGET', part, 'b:' .. l.sku))
  s.sold = redis.call('HINCRBY', l.sku_key, 'sold', -l.qty)
  if how == 'h' and l.held then
    s.held = redis.call('HINCRBY', l.sku_key, 'held', l.qty)
    emit(stream, 'unconfirmed', tenant, l.sku, l.qty, id, user, s.on_hand, s.held, s.sold, s.bo, av0,
      available(s, now), now, 'st', previous, 'lbo', bo)
  else
    add_user_units(l.user_key, user, -l.qty)
    s.bo = drop_backorder(l.sku_key, KEYS[3 + 2 * n + i], part, l.sku, id, bo) or s.bo
    drop_quota(KEYS[3 + 3 * n + i], part, l.sku, channel)
    emit(stream, 'unsold', tenant, l.sku, l.qty, id, user, s.on_hand, s.held, s.sold, s.bo, av0,
      available(s, now), now, 'st', previous, 'lbo', 0)
  end
end
redis.call('HSET', part, 'st', previous)
redis.call('HDEL', part, 'pst', 'cf', 'ce')
if previous == 'held' and deadline > 0 then
  redis.call('ZADD', expiry, deadline, id)
end
return {0, previous}

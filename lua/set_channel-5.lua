--[[
  Creates or updates one sales channel of a SKU: its ring-fenced quota, its priority and whether it may
  borrow from the shared pool (includes/channels.lua says how these share the stock).

  Refuses (changing nothing) a quota below the units the channel's reservations already took from it:
  `used <= quota` holds for every channel at every instant. A SKU has at most ARGV[10] channels.

  Input:
    KEYS[1] SKU hash                    sh:{s}:sku:<tenant>:<sku>
    KEYS[2] the SKU's channels          sh:{s}:chan:<tenant>:<sku>
    KEYS[3] shard event stream          sh:{s}:events
    KEYS[4] idempotency record          (untouched when ARGV[8] is '')
    KEYS[5] shard ready marker          sh:{s}:ready

    ARGV[1] tenant
    ARGV[2] sku
    ARGV[3] channel
    ARGV[4] quota, integer >= 0
    ARGV[5] priority, integer (higher keeps its fence longer when stock runs short)
    ARGV[6] borrow: 1 may borrow from the shared pool, 0 may not
    ARGV[7] now, ms since the epoch
    ARGV[8] idempotency fingerprint, '' for none
    ARGV[9] idempotency record TTL, seconds
    ARGV[10] the most channels a SKU may have

  Output:
    {1 | 0, quota, used, priority, borrow}  1 when the channel was created; event 'channel_set' (no
                                            counter moves; extra fields channel, quota, priority, borrow)
    {-1}               SKU_NOT_FOUND
    {-4, used}         STOCK_CONFLICT: the quota would fall below what the channel already took
    {-15, max}         TOO_MANY_CHANNELS
    {-8}               IDEMPOTENCY_CONFLICT
    {-10}              NOT_READY: the shard awaits a rebuild; nothing changed
]]
--@include common
--@include idempotency
--@include ready

if not shard_ready(KEYS[5]) then
  return {-10}
end
local replay = idem_replay(KEYS[4], ARGV[8])
if replay then
  return replay
end

local chan_key, channel = KEYS[2], ARGV[3]
local quota, priority, borrow, now = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local s = read_sku(KEYS[1])
local result
if not s then
  result = {-1}
else
  local current = redis.call('HMGET', chan_key, 'q:' .. channel, 'u:' .. channel)
  local used = num(current[2])
  local created = current[1] == false and 1 or 0
  if quota < used then
    result = {-4, used}
  elseif created == 1 and s.channels >= tonumber(ARGV[10]) then
    result = {-15, tonumber(ARGV[10])}
  else
    redis.call('HSET', chan_key, 'q:' .. channel, quota, 'u:' .. channel, used, 'p:' .. channel, priority,
      'b:' .. channel, borrow)
    if created == 1 then
      redis.call('HINCRBY', KEYS[1], 'channels', 1)
    end
    local av = available(s, now)  -- a fence moves no unit: what anyone may take stays the same
    emit(KEYS[3], 'channel_set', ARGV[1], ARGV[2], 0, '', '', s.on_hand, s.held, s.sold, s.bo, av, av, ARGV[7],
      'channel', channel, 'quota', quota, 'priority', priority, 'borrow', borrow)
    result = {created, quota, used, priority, borrow}
  end
end
idem_store(KEYS[4], ARGV[8], ARGV[9], result)
return result

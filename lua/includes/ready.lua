--[[
  The shard's ready marker (sh:{s}:ready) is written only by a rebuild from PostgreSQL. A shard
  without it has lost its data (Redis restarted empty, was flushed, or failed over to an empty
  replica): selling from it would sell stock that is already gone, so every stock script refuses with
  NOT_READY (-10) until the shard is rebuilt. Every such script receives the marker as its last KEY.
]]
local function shard_ready(marker)
  return redis.call('EXISTS', marker) == 1
end

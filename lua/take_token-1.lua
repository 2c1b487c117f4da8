--[[
  Takes one token from a token bucket (a rate limit per user or per client IP), or says how long until
  one is there. The bucket holds up to `burst` tokens and refills at `rate` tokens per second; a bucket
  never seen, or idle long enough, is full. The key expires once the bucket would be full again, so
  idle users and addresses cost no memory.

  Input:
    KEYS[1] the bucket            rl:{<kind>:<tenant>:<subject>} (its own hash slot: one key per call)
    ARGV[1] now, ms since the epoch (caller's clock, as for every script)
    ARGV[2] rate, tokens per second (> 0)
    ARGV[3] burst, the bucket's size (>= 1)

  Output:
    {1, tokens}        allowed; whole tokens left after this one
    {0, wait_ms}       refused: the next token arrives in wait_ms (>= 1); nothing changed
]]

local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]), tonumber(state[2])
if not tokens then
  tokens, at = burst, now
end
if now > at then
  -- refill for the time passed (a clock that went backwards refills nothing)
  tokens = math.min(burst, tokens + (now - at) * rate / 1000)
  at = now
end
if tokens < 1 then
  return {0, math.max(1, math.ceil((1 - tokens) * 1000 / rate))}
end
tokens = tokens - 1
-- %.17g keeps the fraction exactly: tostring() would round it to 14 digits
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', string.format('%d', at))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) * 1000 / rate) + 1000)
return {1, math.floor(tokens)}

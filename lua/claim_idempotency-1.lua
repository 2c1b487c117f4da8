--[[
  Claims an Idempotency-Key for an operation that spans several script calls (a reservation, a confirm,
  a release). The first claim stores the request's fingerprint and a reference chosen by the caller
  (the reservation id to use); every later claim with the same fingerprint gets that same reference
  back, so a retry after a crash re-runs the operation with the same id and the id-idempotent scripts
  change nothing twice. Once the operation answers, the caller stores the answer (field 'ans') and
  later claims replay it.

  Input:
    KEYS[1] idempotency record          sh:{s}:idem:<tenant>:<digest>
    ARGV[1] fingerprint (method, path, canonical body)
    ARGV[2] reference to store on first claim
    ARGV[3] TTL, seconds

  Output:
    {0, ref}         claimed now
    {1, ref}         claimed before with the same request, no answer stored yet: re-run with ref
    {2, ref, ans}    claimed before and answered: replay ans
    {-8}             IDEMPOTENCY_CONFLICT: the key was used with another request
]]

local rec = redis.call('HMGET', KEYS[1], 'fp', 'ref', 'ans')
if not rec[1] then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'ref', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return {0, ARGV[2]}
end
if rec[1] ~= ARGV[1] then
  return {-8}
end
if rec[3] then
  return {2, rec[2], rec[3]}
end
return {1, rec[2]}

--[[
  Idempotency records kept in the same slot as the change they guard, so the first answer is stored
  atomically with the change. A record is a HASH: fp (fingerprint of method, path and body) and ans
  (the script's first result, cjson-encoded) or ref (a value chosen on first use, e.g. a reservation id).
]]

-- Returns nil when the key is unused, the stored result when fingerprints match, or the
-- IDEMPOTENCY_CONFLICT reply when the same key came with another request.
local function idem_replay(key, fingerprint)
  if fingerprint == '' then
    return nil
  end
  local rec = redis.call('HMGET', key, 'fp', 'ans')
  if not rec[1] then
    return nil
  end
  if rec[1] ~= fingerprint then
    return {-8}
  end
  return cjson.decode(rec[2])
end

local function idem_store(key, fingerprint, ttl_seconds, result)
  if fingerprint == '' then
    return
  end
  redis.call('HSET', key, 'fp', fingerprint, 'ans', cjson.encode(result))
  redis.call('EXPIRE', key, ttl_seconds)
end

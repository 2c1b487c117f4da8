-- wrk request generator for `make bench`: POST a one-line reservation of the hot SKU, every request by
-- another user (user ids carry the wrk thread, so threads never repeat each other's).
-- The SKU comes from the environment (BENCH_SKU); the path is the URL's.
local sku = os.getenv("BENCH_SKU") or "bench-hot"
local thread_counter = 0
local n = 0
-- `prefix` is a global: setup() sets it in each thread's own Lua state

function setup(thread)
  thread_counter = thread_counter + 1
  thread:set("prefix", "w" .. thread_counter .. "-")
end

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  n = n + 1
  return wrk.format(nil, nil, nil,
    '{"user_id":"' .. (prefix or "w-") .. n .. '","items":[{"sku":"' .. sku .. '","quantity":1}]}')
end

-- non-2xx answers are counted by wrk itself ("Non-2xx or 3xx responses"); the bench treats any as a failure

-- Heartbeat for every lease this instance holds: extend, or re-add a missing one (Redis
-- restarted or flushed) when its set has room; else report it lost.
-- KEYS: one lease set per held (lease, key) pair; ARGV: ttl s, then (lease id, limit) pairs
-- Returns the 1-based indexes of lost pairs.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[1])
local lost = {}
for i = 1, #KEYS do
  local k, id, limit = KEYS[i], ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  if redis.call('ZSCORE', k, id) or redis.call('ZCARD', k) < limit then
    redis.call('ZADD', k, string.format('%.6f', now + ttl), id)
    redis.call('PEXPIRE', k, math.ceil(ttl * 1000) + 1000)
  else
    lost[#lost + 1] = i
  end
end
return lost

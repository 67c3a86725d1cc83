-- Instance registry heartbeat. KEYS: the registry (sorted set, score = expiry)
-- ARGV: instance name, ttl s. Returns the number of live instances.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], string.format('%.6f', now + tonumber(ARGV[2])), ARGV[1])
return redis.call('ZCARD', KEYS[1])

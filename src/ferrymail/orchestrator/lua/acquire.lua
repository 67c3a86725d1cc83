-- A new connection's slots, all or none (ferrymail.orchestrator.redis).
-- KEYS: nc lease sets (sorted sets: member = lease id, score = expiry), then ni interval keys
-- ARGV: lease id, ttl s, nc, ni, nc limits, ni intervals (s)
-- Returns {"ok"} | {"concurrency", i, held, limit} | {"connectinterval", j, wait_s}
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local id, ttl = ARGV[1], tonumber(ARGV[2])
local nc, ni = tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 1, nc do
  local k = KEYS[i]
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  local held = redis.call('ZCARD', k)
  local limit = tonumber(ARGV[4 + i])
  if held >= limit then return {'concurrency', i, held, limit} end
end
local tats = {}
for j = 1, ni do
  local interval = tonumber(ARGV[4 + nc + j])
  local tat = tonumber(redis.call('GET', KEYS[nc + j]) or '0')
  if tat < now then tat = now end
  if now < tat - 1e-9 then return {'connectinterval', j, string.format('%.6f', tat - now)} end
  tats[j] = tat + interval
end
for i = 1, nc do
  redis.call('ZADD', KEYS[i], string.format('%.6f', now + ttl), id)
  redis.call('PEXPIRE', KEYS[i], math.ceil(ttl * 1000) + 1000)
end
for j = 1, ni do
  redis.call('SET', KEYS[nc + j], string.format('%.6f', tats[j]),
             'PX', math.ceil((tats[j] - now) * 1000) + 1000)
end
return {'ok'}

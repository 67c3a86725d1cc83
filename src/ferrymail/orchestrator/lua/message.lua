-- Before a message: the connection's leases still held (extended), every rate, all or none.
-- KEYS: nc lease sets, then nr rate keys (GCRA theoretical arrival time, s)
-- ARGV: lease id, ttl s, nc, nr, ahead s, slots, nc limits, then nr pairs (interval s, burst)
-- `slots` consecutive rate slots are reserved when the first is at most `ahead` seconds in
-- the future (GCRA, see limiter.py); the caller spaces them by the largest interval, so with
-- slots > 1 each counts as that interval against every rate (gcra() `spacing`, prefetch.py).
-- Returns {"ok", hold_s} | {"lost", i} | {"rate", j, wait_s}
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local id, ttl = ARGV[1], tonumber(ARGV[2])
local nc, nr, ahead = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local slots = tonumber(ARGV[6])
for i = 1, nc do
  local k = KEYS[i]
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  if not redis.call('ZSCORE', k, id) and redis.call('ZCARD', k) >= tonumber(ARGV[6 + i]) then
    return {'lost', i}
  end
end
local tats, worst, worst_j, hold = {}, -1, 0, 0
local spacing = 0
for j = 1, nr do
  local interval = tonumber(ARGV[6 + nc + 2 * j - 1])
  if interval > spacing then spacing = interval end
end
for j = 1, nr do
  local interval = tonumber(ARGV[6 + nc + 2 * j - 1])
  local burst = tonumber(ARGV[6 + nc + 2 * j])
  local tat = tonumber(redis.call('GET', KEYS[nc + j]) or '0')
  if tat < now then tat = now end
  local allow_at = tat - (burst - 1) * interval
  if allow_at - now > ahead + 1e-9 then
    if allow_at - now - ahead > worst then worst, worst_j = allow_at - now - ahead, j end
  else
    local step = interval
    if slots > 1 then step = spacing end
    tats[j] = tat + slots * step
    if allow_at - now > hold then hold = allow_at - now end
  end
end
if worst_j > 0 then return {'rate', worst_j, string.format('%.6f', worst)} end
for j = 1, nr do
  redis.call('SET', KEYS[nc + j], string.format('%.6f', tats[j]),
             'PX', math.ceil((tats[j] - now) * 1000) + 1000)
end
for i = 1, nc do
  redis.call('ZADD', KEYS[i], string.format('%.6f', now + ttl), id)
  redis.call('PEXPIRE', KEYS[i], math.ceil(ttl * 1000) + 1000)
end
return {'ok', string.format('%.6f', hold)}

-- A new connection stands: its connection intervals count from then (ferrymail.orchestrator.redis).
-- The grant (acquire.lua) was taken before connecting; a connect delayed after it must not
-- let the next connection come closer than the interval. Never moves a state earlier.
-- KEYS: interval keys; ARGV: seconds since the connection was established, then intervals (s)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local at = now - tonumber(ARGV[1])
for j = 1, #KEYS do
  local tat = tonumber(redis.call('GET', KEYS[j]) or '0')
  local want = at + tonumber(ARGV[1 + j])
  if want > tat then
    redis.call('SET', KEYS[j], string.format('%.6f', want),
               'PX', math.ceil((want - now) * 1000) + 1000)
  end
end
return #KEYS

-- A connection closed: its lease leaves every set. KEYS: lease sets; ARGV: lease id
for i = 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return #KEYS

-- Put a TTL on keys that have none (EXPIRE ... NX): retiring an epoch, or sweeping one a
-- crash left without TTLs. Never extends an existing TTL.
-- KEYS = the keys; ARGV[1] = ttl seconds. Returns how many keys got a TTL.
local n = 0
for i = 1, #KEYS do
  n = n + redis.call('EXPIRE', KEYS[i], ARGV[1], 'NX')
end
return n

-- Renew a fenced lease. KEYS[1] = lease, KEYS[2] = fence counter.
-- ARGV[1] = our lease value, ARGV[2] = ttl ms, ARGV[3] = our token.
-- Ours: PEXPIRE. Absent while the fence still equals our token (nobody acquired since: a
-- long iteration, or Redis restarted from an AOF without the lease): SET it again.
-- Returns 1 when the lease is ours (renewed or re-set), 0 when it is not.
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if cur == false and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0

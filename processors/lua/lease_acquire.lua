-- Take a free fenced lease (the equivalent of SET NX PX, plus a fence).
-- KEYS[1] = lease, KEYS[2] = fence counter. ARGV[1] = owner, ARGV[2] = ttl ms.
-- If the lease is absent: INCR the fence (the new token: a lease epoch that only grows) and
-- SET the lease to "<token>:<owner>" with the TTL. Returns the token, or 0 when held.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], t .. ':' .. ARGV[1], 'PX', ARGV[2])
return t

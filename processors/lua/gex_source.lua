-- The latest full-chain GEX source of a symbol, with admission.
-- KEYS[1] = massive:gex:source:{SYM} (HASH ts_ns, spot, data)
-- ARGV[1] = snapshot ts_ns, ARGV[2] = spot ("" = none), ARGV[3] = data (GexSource msgpack),
-- ARGV[4] = TTL (s)
-- Only a strictly newer snapshot replaces the stored one (a redelivered or reordered pointer
-- never rolls the source back). ts compared as strings: length first, then lexically.
-- Returns 1 written, 0 not newer.
local cur = redis.call('HGET', KEYS[1], 'ts_ns')
if cur and (#cur > #ARGV[1] or (#cur == #ARGV[1] and cur >= ARGV[1])) then
  return 0
end
redis.call('HSET', KEYS[1], 'ts_ns', ARGV[1], 'spot', ARGV[2], 'data', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1

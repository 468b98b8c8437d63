-- Spot admission: HASH massive:spot:latest fields "<SYM>" and "<SYM>:ts_ns".
-- KEYS[1] = spot hash; ARGV = SYM1, value1, ts1, SYM2, value2, ts2, ...
-- A value replaces the stored one only if its ts is strictly newer (rules A/B/C).
-- Returns the number of symbols updated.
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local n = 0
for i = 1, #ARGV, 3 do
  local sym, val, ts = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local cur = redis.call('HGET', KEYS[1], sym .. ':ts_ns')
  if (not cur) or newer(ts, cur) then
    redis.call('HSET', KEYS[1], sym, val, sym .. ':ts_ns', ts)
    n = n + 1
  end
end
return n

-- Admission write of heatmap tiles into staging (processors/tile_builder.py).
-- KEYS: staging, manifest. ARGV: epoch, then tile_id, value pairs; a staged value starts
-- with its seq (admission clock) and ":" (processors.heatmap.staged_value).
-- Returns -9 when the staged epoch is not ARGV[1]; else one status per tile:
-- 1 admitted (slot absent or seq strictly greater), 0 equal (discarded), -1 older (discarded).
-- seq values are non-negative decimal strings: compared by length, then lexically (exact;
-- Lua numbers are doubles and would round nanosecond sums).
if redis.call('HGET', KEYS[2], 'epoch') ~= ARGV[1] then return -9 end
local find, sub = string.find, string.sub
local n = (#ARGV - 1) / 2
local out, ids, tv = {}, {}, {}
local wrote = false
for a = 1, n, 1000 do
  local b = math.min(a + 999, n)
  for i = a, b do ids[i - a + 1] = ARGV[2 * i] end
  local old = redis.call('HMGET', KEYS[1], unpack(ids, 1, b - a + 1))
  for i = a, b do
    local o, v = old[i - a + 1], ARGV[2 * i + 1]
    local seq = sub(v, 1, find(v, ':', 1, true) - 1)
    local st
    if not o then st = 1
    else
      local c = find(o, ':', 1, true)
      local os = c and sub(o, 1, c - 1) or ''
      if #seq ~= #os then if #seq > #os then st = 1 else st = -1 end
      elseif seq > os then st = 1
      elseif seq == os then st = 0
      else st = -1 end
    end
    out[i] = st
    if st == 1 then
      tv[#tv + 1] = ARGV[2 * i]; tv[#tv + 1] = v
    end
  end
  if #tv > 0 then
    redis.call('HSET', KEYS[1], unpack(tv))
    tv = {}
    wrote = true
  end
end
-- staging no longer holds exactly one builder's writes (see TileBuilder.incremental)
if wrote then redis.call('HSET', KEYS[2], 'writer', 'admission') end
return out

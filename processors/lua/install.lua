-- Install a full build of an epoch's tiles as the staging hash (processors/tile_builder.py).
-- KEYS: staging, manifest, build.
-- ARGV: epoch, created_ns, expected, built_ns, roots (JSON expiry -> option root).
-- 1 = installed (build renamed onto staging, manifest rewritten);
-- 0 = this epoch is already installed (build dropped; caller merges with admission);
-- -1 = a newer epoch is installed (build dropped).
local cur = redis.call('HGET', KEYS[2], 'epoch')
if cur == ARGV[1] then redis.call('DEL', KEYS[3]) return 0 end
local cc = redis.call('HGET', KEYS[2], 'created_ns')
if cc and (#cc > #ARGV[2] or (#cc == #ARGV[2] and cc > ARGV[2])) then
  redis.call('DEL', KEYS[3])
  return -1
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('RENAME', KEYS[3], KEYS[1])
else
  redis.call('DEL', KEYS[1])
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'epoch', ARGV[1], 'created_ns', ARGV[2], 'expected', ARGV[3],
           'built_ns', ARGV[4], 'roots', ARGV[5])
return 1

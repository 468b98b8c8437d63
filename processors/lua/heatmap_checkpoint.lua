-- Install a heatmap model checkpoint (processors/heatmap/publisher.py,
-- Publisher._write_checkpoint): the leader wrote it piece by piece into its own temp key;
-- this renames it onto the model key, so a reader sees the previous checkpoint or the whole
-- new one, never a part.
-- KEYS (one {SYM} slot): fence, lease, version, temp key (heatmap_model_tmp), model.
-- ARGV: token, lease value, the checkpoint's version, its length in bytes.
-- Returns 1 installed, -1 fenced or lease held by another owner, -4 the version moved on,
-- -6 the temp key is not ARGV[4] bytes long (expired mid-write); the temp key is dropped
-- whenever it is not installed.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  redis.call('DEL', KEYS[4])
  return -1
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then
  redis.call('DEL', KEYS[4])
  return -1
end
if redis.call('GET', KEYS[3]) ~= ARGV[3] then
  redis.call('DEL', KEYS[4])
  return -4
end
if redis.call('STRLEN', KEYS[4]) ~= tonumber(ARGV[4]) then
  redis.call('DEL', KEYS[4])
  return -6
end
redis.call('RENAME', KEYS[4], KEYS[5])
redis.call('PERSIST', KEYS[5])
return 1

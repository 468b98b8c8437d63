-- Read the same fields of many contract hashes (of ONE epoch: one hash slot).
-- KEYS = contract hashes; ARGV = field names. Returns one string per key: the values joined
-- by "|" (absent = empty; values are numbers or chain|ws, never "|"), or "" when the hash
-- does not exist. One bulk string per contract keeps client-side reply parsing cheap.
local out = {}
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], unpack(ARGV))
  local any = false
  for j = 1, #ARGV do
    if v[j] then any = true else v[j] = '' end
  end
  if any then out[i] = table.concat(v, '|') else out[i] = '' end
end
return out

-- One heatmap model version (processors/publisher.py, Publisher._write).
-- KEYS (one {SYM} slot): fence, lease, the symbol's active-epoch pointer, version, diff
-- stream, chain head; for a snapshot version (ModelDiff.snapshot) also the leader's
-- checkpoint temp key and the model key.
-- ARGV: token, lease value, epoch, version, diff id, diff json, lease ttl ms, the diff
-- stream's MINID (retention), prev id ("" = none); for a snapshot version also the temp
-- key's length in bytes. The checkpoint (written there piece by piece, its diff_id = the
-- diff id) is renamed onto the model key with the diff: a reader that meets the diff finds
-- the model key at its version or later.
-- Returns {1} ok, {-1} fenced, {-2} lease held by another owner, {-3} epoch not active,
-- {-4} version is not current + 1 or prev id is not the chain's head (Redis lost writes we
-- made, or someone else published), {-5, last id} diff id not above the stream's last
-- generated id (the caller picks a later id, rewrites the checkpoint and retries), {-6} the
-- temp key is not ARGV[10] bytes long (expired mid-write). The temp key is dropped whenever
-- it is not installed.
local snapshot = #KEYS >= 8
local function refuse(code)
  if snapshot then redis.call('DEL', KEYS[7]) end
  return {code}
end
local fence = redis.call('GET', KEYS[1])
if fence ~= ARGV[1] then return refuse(-1) end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then return refuse(-2) end
if redis.call('GET', KEYS[3]) ~= ARGV[3] then return refuse(-3) end
local cur = redis.call('GET', KEYS[4]) or '0'
if tonumber(ARGV[4]) ~= tonumber(cur) + 1 then return refuse(-4) end
if (redis.call('GET', KEYS[6]) or '') ~= ARGV[9] then return refuse(-4) end
if snapshot and redis.call('STRLEN', KEYS[7]) ~= tonumber(ARGV[10]) then return refuse(-6) end
local added = redis.pcall('XADD', KEYS[5], 'MINID', '~', ARGV[8], ARGV[5], 'd', ARGV[6])
if type(added) == 'table' and added.err then
  if snapshot then redis.call('DEL', KEYS[7]) end  -- its diff_id is this refused id
  -- the id is not above the stream's top: report the last generated id (XINFO only on
  -- this rare path: it also returns the first and last entries)
  local info = redis.call('XINFO', 'STREAM', KEYS[5])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then return {-5, info[i + 1]} end
  end
  return redis.error_reply(added.err)
end
if snapshot then
  redis.call('RENAME', KEYS[7], KEYS[8])
  redis.call('PERSIST', KEYS[8])
end
redis.call('SET', KEYS[4], ARGV[4])
redis.call('SET', KEYS[6], ARGV[5])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[7])
return {1}

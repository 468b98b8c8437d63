-- One GEX model version (processors/gex.py), atomically.
-- KEYS: fence, lease, diff stream, model, calls, puts, chain head, levels stream.
-- ARGV: token, lease value, MINID, diff json, model json without its diff_id, calls, puts,
-- prev id ("" = none), levels json, levels MINID (exact: one small entry per publish, so a
-- few to drop at most).
-- Returns the diff id; -1: fenced (the fence is not our token, or another owner holds the
-- lease); 0: prev id is not the chain head (Redis lost versions we published, or another
-- leader published): reload and rebuild.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then return -1 end
if (redis.call('GET', KEYS[7]) or '') ~= ARGV[8] then return 0 end
local id = redis.call('XADD', KEYS[3], 'MINID', '~', ARGV[3], '*', 'd', ARGV[4])
redis.call('SET', KEYS[4], ARGV[5] .. '"' .. id .. '"}')
redis.call('SET', KEYS[5], ARGV[6])
redis.call('SET', KEYS[6], ARGV[7])
redis.call('SET', KEYS[7], id)
redis.call('XADD', KEYS[8], 'MINID', ARGV[10], '*', 'd', ARGV[9])
return id

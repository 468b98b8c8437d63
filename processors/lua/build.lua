-- Build part of a WARMING epoch: contract hashes, topology SET, planes, GEX projection.
-- KEYS[1] = epoch:{eid}:meta (declares the slot; every key written shares the {eid} tag)
-- ARGV[1] = key prefix "epoch:{eid}:"
-- ARGV[2] = msgpack array of rows {cid, strike, expiry_yyyymmdd, gex_json, f1, v1, f2, v2, ...}
--           (all strings; the f/v pairs are the contract hash fields)
-- Refuses to write unless the epoch is warming (never touches an active/retired epoch).
-- Returns the number of contracts written, or -1 if the epoch is not warming.
if redis.call('HGET', KEYS[1], 'state') ~= 'warming' then
  return -1
end
local p = ARGV[1]
local rows = cmsgpack.unpack(ARGV[2])
local cids, strikes, expiries, gex = {}, {}, {}, {}
for r = 1, #rows do
  local row = rows[r]
  local cid = row[1]
  redis.call('HSET', p .. 'contract:' .. cid, unpack(row, 5))
  cids[#cids + 1] = cid
  strikes[#strikes + 1] = row[2]; strikes[#strikes + 1] = cid
  expiries[#expiries + 1] = row[3]; expiries[#expiries + 1] = cid
  gex[#gex + 1] = cid; gex[#gex + 1] = row[4]
end
if #rows > 0 then
  redis.call('SADD', p .. 'contracts', unpack(cids))
  redis.call('ZADD', p .. 'by_strike', unpack(strikes))
  redis.call('ZADD', p .. 'by_expiry', unpack(expiries))
  redis.call('HSET', p .. 'gex', unpack(gex))
end
return #rows

-- Build part of a WARMING epoch: contract hashes, topology SET, planes, GEX projection.
-- KEYS: the epoch's meta, contracts SET, by_strike, by_expiry, gex (keys.epoch_fixed_keys
--       order), then the contract hash of each row, in row order (one {SYM} slot).
-- ARGV[1] = msgpack array of rows {cid, strike, expiry_yyyymmdd, gex_json, f1, v1, f2, v2, ...}
--           (all strings; the f/v pairs are the contract hash fields)
-- Refuses to write unless the epoch is warming (never touches an active/retired epoch).
-- Returns the number of contracts written, or -1 if the epoch is not warming.
if redis.call('HGET', KEYS[1], 'state') ~= 'warming' then
  return -1
end
local rows = cmsgpack.unpack(ARGV[1])
local cids, strikes, expiries, gex = {}, {}, {}, {}
for r = 1, #rows do
  local row = rows[r]
  local cid = row[1]
  redis.call('HSET', KEYS[5 + r], unpack(row, 5))
  cids[#cids + 1] = cid
  strikes[#strikes + 1] = row[2]; strikes[#strikes + 1] = cid
  expiries[#expiries + 1] = row[3]; expiries[#expiries + 1] = cid
  gex[#gex + 1] = cid; gex[#gex + 1] = row[4]
end
if #rows > 0 then
  redis.call('SADD', KEYS[2], unpack(cids))
  redis.call('ZADD', KEYS[3], unpack(strikes))
  redis.call('ZADD', KEYS[4], unpack(expiries))
  redis.call('HSET', KEYS[5], unpack(gex))
end
return #rows

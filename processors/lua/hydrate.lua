-- WS values -> contract hashes of the ACTIVE epoch, with admission (DESIGN invariant 4).
-- KEYS[1] = epoch:{eid}:meta (declares the slot; every contract key shares the {eid} tag)
-- ARGV[1] = contract key prefix "epoch:{eid}:contract:"
-- ARGV[2] = msgpack array of quotes {cid, ts_ns, bid, ask, mid}   (strings)
-- ARGV[3] = msgpack array of trades {cid, ts_ns, last, size}      (strings)
-- Per kind: A slot absent -> create; B strictly newer ts -> replace; C older/equal -> discard.
-- Returns {status, misses, i1, i2, ...}: status 1 = epoch not active (nothing written, the
-- caller re-resolves); misses = contract hashes that do not exist (never created here);
-- i = 0-based index (quotes first, then trades) of each event that was applied OR that is
-- already stored exactly (same ts, same values): that very event was applied by an earlier
-- delivery whose dirty notification may have been lost, so the caller notifies again.
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then
  return {1, 0}
end
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local prefix = ARGV[1]
local quotes = cmsgpack.unpack(ARGV[2])
local trades = cmsgpack.unpack(ARGV[3])
local out = {0, 0}
local misses = 0
local nq = #quotes
for n = 1, nq do
  local e = quotes[n]
  local key = prefix .. e[1]
  local ts = e[2]
  local cur = redis.call('HMGET', key, 'type', 'quote_ts', 'bid', 'ask', 'ts_ns')
  if not cur[1] then
    misses = misses + 1
  elseif (not cur[2]) or newer(ts, cur[2]) then
    local tsn = cur[5]
    if (not tsn) or newer(ts, tsn) then tsn = ts end
    redis.call('HSET', key, 'bid', e[3], 'ask', e[4], 'mid', e[5], 'quote_ts', ts,
      'ts_ns', tsn, 'src', 'ws')
    out[#out + 1] = n - 1
  elseif cur[2] == ts and cur[3] == e[3] and cur[4] == e[4] then
    out[#out + 1] = n - 1
  end
end
for n = 1, #trades do
  local e = trades[n]
  local key = prefix .. e[1]
  local ts = e[2]
  local cur = redis.call('HMGET', key, 'type', 'trade_ts', 'last', 'size', 'ts_ns')
  if not cur[1] then
    misses = misses + 1
  elseif (not cur[2]) or newer(ts, cur[2]) then
    local tsn = cur[5]
    if (not tsn) or newer(ts, tsn) then tsn = ts end
    redis.call('HSET', key, 'last', e[3], 'size', e[4], 'trade_ts', ts, 'ts_ns', tsn,
      'src', 'ws')
    out[#out + 1] = nq + n - 1
  elseif cur[2] == ts and cur[3] == e[3] and cur[4] == e[4] then
    out[#out + 1] = nq + n - 1
  end
end
out[2] = misses
return out

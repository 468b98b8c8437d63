-- Chain snapshot values -> contract hashes of the ACTIVE epoch (same topology), admission.
-- KEYS[1] = the epoch's meta, KEYS[2] = its gex HASH, KEYS[2 + i] = the contract hash of
--           row i (1-based): every key of one epoch shares its symbol's {SYM} slot
-- ARGV[1] = msgpack array of rows (all strings, "" = absent):
--   {cid, quote_ts, bid, ask, mid, trade_ts, last, size, iv, delta, gamma, oi, gex_json}
-- ARGV[2] = the snapshot's ts: a contract quoted in it has its quote confirmed then
--   (quote_rx_ts = the later of the stored one and ARGV[2]). That is a change of the
--   contract (reported): tiles judge a quote's age by when it was last received
--   (processors/heatmap.py), so they are recomputed with it.
-- Quotes / trades: A slot absent -> set; B strictly newer ts -> replace; C older/equal -> keep.
-- iv/delta/gamma/oi: refreshed from every snapshot when present (WS carries none).
-- GEX projection: field <cid> of the epoch's gex HASH (KEYS[2]) rewritten for every row.
-- Returns {status, misses, i1, i2, ...}: status 1 = epoch not active (nothing written);
-- misses = rows whose contract hash does not exist; i = 0-based index of each row whose
-- stored contract fields actually changed.
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then
  return {1, 0}
end
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local rows = cmsgpack.unpack(ARGV[1])
local greeks = {'iv', 'delta', 'gamma', 'oi'}
local gex = {}
local out = {0, 0}
local misses = 0
for n = 0, #rows - 1 do
  local a = rows[n + 1]
  local key = KEYS[3 + n]
  local cur = redis.call('HMGET', key, 'type', 'quote_ts', 'bid', 'ask', 'trade_ts', 'last',
    'size', 'ts_ns', 'iv', 'delta', 'gamma', 'oi', 'quote_rx_ts')
  if not cur[1] then
    misses = misses + 1
  else
    local set = {}
    local tsn = cur[8]
    local qts = a[2]
    if qts ~= '' and ((not cur[2]) or newer(qts, cur[2])) then
      set[#set + 1] = 'bid'; set[#set + 1] = a[3]
      set[#set + 1] = 'ask'; set[#set + 1] = a[4]
      set[#set + 1] = 'mid'; set[#set + 1] = a[5]
      set[#set + 1] = 'quote_ts'; set[#set + 1] = qts
      if (not tsn) or newer(qts, tsn) then tsn = qts end
    end
    local tts = a[6]
    local drop_size = false
    if tts ~= '' and ((not cur[5]) or newer(tts, cur[5])) then
      set[#set + 1] = 'last'; set[#set + 1] = a[7]
      if a[8] ~= '' then
        set[#set + 1] = 'size'; set[#set + 1] = a[8]
      elseif cur[7] then
        drop_size = true
      end
      set[#set + 1] = 'trade_ts'; set[#set + 1] = tts
      if (not tsn) or newer(tts, tsn) then tsn = tts end
    end
    if #set > 0 then
      set[#set + 1] = 'ts_ns'; set[#set + 1] = tsn
      set[#set + 1] = 'src'; set[#set + 1] = 'chain'
    end
    for g = 1, 4 do
      local v = a[8 + g]
      if v ~= '' and v ~= cur[8 + g] then
        set[#set + 1] = greeks[g]; set[#set + 1] = v
      end
    end
    if qts ~= '' and ARGV[2] and ((not cur[13]) or newer(ARGV[2], cur[13])) then
      set[#set + 1] = 'quote_rx_ts'; set[#set + 1] = ARGV[2]
    end
    if #set > 0 then
      redis.call('HSET', key, unpack(set))
      out[#out + 1] = n
    end
    if drop_size then
      redis.call('HDEL', key, 'size')
    end
    gex[#gex + 1] = a[1]; gex[#gex + 1] = a[13]
  end
end
if #gex > 0 then
  redis.call('HSET', KEYS[2], unpack(gex))
end
out[2] = misses
return out

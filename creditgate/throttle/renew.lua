-- Renew the parallel leases of one request still in flight, so that a lease
-- outlives its request only when the process holding it died.
-- KEYS    the lease sets holding the lease (one account: one hash tag)
-- ARGV[1] the lease id, ARGV[2] the lease time-to-live in ms
-- A lease that already expired stays expired: its slot may be taken by now.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local renewed = 0
for i = 1, #KEYS do
  local expiry = tonumber(redis.call('ZSCORE', KEYS[i], ARGV[1]))
  if expiry ~= nil and expiry > now then
    redis.call('ZADD', KEYS[i], now + ttl, ARGV[1])
    redis.call('PEXPIRE', KEYS[i], ttl + 1000)
    renewed = renewed + 1
  end
end
return renewed

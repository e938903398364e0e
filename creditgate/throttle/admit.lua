-- One throttle decision: check every limit of a request and take from all of
-- them or from none; or give back what a finished request over-took.
--
-- KEYS[i]   the key of limit i; every key of one account carries the hash tag
--           {account id}, so the script runs on a single Redis Cluster shard.
-- ARGV[1]   mode: "a" admit (check, then take all or none), "q" query (check,
--           take nothing), "r" return (apply corrections, release leases)
-- ARGV[2]   the day zone's offset from UTC in ms now, ARGV[3] at the day's end
-- ARGV[4..] four per key: kind, limit, param, cost
--   "b"  token bucket: limit units per param ms, refilled continuously.
--        cost: units to take ("a"/"q"), or to take back ("r": a negative
--        correction refunds, capped at the bucket's size; a positive one is a
--        debt that may leave the level negative, so later requests wait)
--   "p"  parallel leases: a sorted set, lease id -> expiry ms; param = the
--        lease time-to-live in ms; cost = the lease id ("r": the lease released)
--   "d"  calendar-day counter (hash: d = day number, n = count) in the day
--        zone; cost = messages to take ("r": the day number of an admission
--        whose message is given back, or "" for none)
--
-- Time is the Redis server's (TIME), never a caller's clock, so every process
-- agrees. Arithmetic is integral: a bucket's level is stored scaled by its
-- period (units x period_ms), so the refill is elapsed_ms x limit exactly.
-- Lua numbers are doubles: exact up to 2^53, which config validation keeps
-- every scaled level below.
--
-- Returns {allowed, deciding key index (0 = none), retry_after_ms, day number,
--          then per key: remaining, reset_ms (time until full / day end)}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mode = ARGV[1]
local offset = tonumber(ARGV[2])
local offset_end = tonumber(ARGV[3])
local day_ms = 86400000
local day = math.floor((now + offset) / day_ms)
local day_end = (day + 1) * day_ms - offset_end
local n = #KEYS

local state = {}
local allowed, deciding, retry = 1, 0, 0

-- A refusal's wait is the longest over every exhausted limit, so that a retry
-- after it finds all of them ready (if nothing else arrived meanwhile).
local function refuse(i, wait)
  allowed = 0
  if deciding == 0 or wait > retry then deciding, retry = i, wait end
end

for i = 1, n do
  local kind = ARGV[4 * i]
  local limit = tonumber(ARGV[4 * i + 1])
  local param = tonumber(ARGV[4 * i + 2])
  local cost = ARGV[4 * i + 3]
  local s = {kind = kind, limit = limit, param = param}
  if kind == 'b' then
    local cap = limit * param
    local h = redis.call('HMGET', KEYS[i], 'l', 't')
    local level, last = tonumber(h[1]), tonumber(h[2])
    if level == nil then level, last = cap, now end
    if now > last then level = math.min(cap, level + (now - last) * limit) end
    s.level, s.cap, s.cost = level, cap, tonumber(cost) * param
    if mode ~= 'r' and s.cost > 0 and level < s.cost then
      refuse(i, math.ceil((s.cost - level) / limit))
    end
  elseif kind == 'p' then
    s.lease = cost
    s.count = redis.call('ZCOUNT', KEYS[i], '(' .. now, '+inf')
    if mode ~= 'r' and s.count >= limit then
      -- A slot frees when one of the caller's own requests ends, which no
      -- clock can promise; the earliest lease expiry is only the worst case.
      refuse(i, 1000)
    end
  else -- 'd'
    local h = redis.call('HMGET', KEYS[i], 'd', 'n')
    s.count = 0
    if tonumber(h[1]) == day then s.count = tonumber(h[2]) or 0 end
    s.cost = cost
    if mode ~= 'r' and s.count + tonumber(cost) > limit then
      refuse(i, day_end - now)
    end
  end
  state[i] = s
end

local take = (mode == 'a' and allowed == 1) or mode == 'r'
local out = {allowed, deciding, retry, day}
for i = 1, n do
  local s, key = state[i], KEYS[i]
  if s.kind == 'b' then
    local level = s.level
    if take and s.cost ~= 0 then
      level = level - s.cost
      if level > s.cap then level = s.cap end
      redis.call('HSET', key, 'l', string.format('%d', level), 't', string.format('%d', now))
      -- An idle bucket's key vanishes once it would be full again: a missing
      -- key reads as a full bucket, so nothing is lost.
      redis.call('PEXPIRE', key, math.ceil((s.cap - level) / s.limit) + 1000)
    end
    out[#out + 1] = math.floor(math.max(0, level) / s.param)
    out[#out + 1] = math.ceil((s.cap - level) / s.limit)
  elseif s.kind == 'p' then
    local count = s.count
    if take and s.lease ~= '' then
      if mode == 'r' then
        count = count - redis.call('ZREM', key, s.lease)
      else
        redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
        redis.call('ZADD', key, now + s.param, s.lease)
        -- Every lease in the set expires within param ms (renewals included).
        redis.call('PEXPIRE', key, s.param + 1000)
        count = count + 1
      end
    end
    out[#out + 1] = math.max(0, s.limit - count)
    out[#out + 1] = 0
  else
    local count = s.count
    if mode == 'a' and take and tonumber(s.cost) ~= 0 then
      count = count + tonumber(s.cost)
      redis.call('HSET', key, 'd', day, 'n', count)
      redis.call('PEXPIREAT', key, day_end + 60000)
    elseif mode == 'r' and s.cost ~= '' and tonumber(s.cost) == day and count > 0 then
      -- Given back only on the day it was taken.
      count = count - 1
      redis.call('HSET', key, 'd', day, 'n', count)
    end
    out[#out + 1] = math.max(0, s.limit - count)
    out[#out + 1] = day_end - now
  end
end
return out

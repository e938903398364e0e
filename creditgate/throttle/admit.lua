-- Check every limit of one request and take from all of them, or from none.
--
-- KEYS[i]  the key of limit i (all keys of an account share the hash tag {acct})
-- ARGV     groups of 4 per key:  kind, limit, param, cost
--   kind "b"  token bucket refilled continuously at limit per param ms;
--             cost may be negative (a refund) and may leave the level negative (a debt)
--   kind "d"  calendar-day counter; param = the zone's offset from UTC in ms
--   kind "p"  parallel leases (sorted set: lease id -> expiry ms); param = lease ttl ms,
--             cost = the lease id ("" to only look)
-- ARGV[4n+1] "1" to take, "0" to only look, "r" to return (refund / release)
--
-- Time is the Redis server's (TIME), never the caller's clock, so every
-- process agrees. Arithmetic is integral: a bucket's level is stored scaled by
-- its period (tokens × period_ms), so refill = elapsed_ms × limit exactly.
--
-- Returns {allowed, failing index (0 = none), retry_after_ms, then per key:
--          remaining, reset_ms}

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local mode = ARGV[4 * n + 1]

local state = {}
local allowed, failing, retry = 1, 0, 0

for i = 1, n do
  local kind = ARGV[4 * i - 3]
  local limit = tonumber(ARGV[4 * i - 2])
  local param = tonumber(ARGV[4 * i - 1])
  local s = {kind = kind, limit = limit, param = param}
  if kind == 'b' then
    local cost = tonumber(ARGV[4 * i])
    local cap = limit * param
    local h = redis.call('HMGET', KEYS[i], 'l', 't')
    local level, last = tonumber(h[1]), tonumber(h[2])
    if level == nil then level, last = cap, now end
    if now > last then level = math.min(cap, level + (now - last) * limit) end
    s.level, s.cost, s.cap = level, cost * param, cap
    if mode == '1' and s.cost > 0 and level < s.cost then
      allowed = 0
      local wait = math.ceil((s.cost - level) / limit)
      if s.cost > cap then wait = -1 end  -- can never fit: report, do not promise
      if failing == 0 then failing, retry = i, wait end
    end
  elseif kind == 'd' then
    local cost = tonumber(ARGV[4 * i])
    local day_ms = 86400000
    local local_now = now + param
    s.day_end = local_now - (local_now % day_ms) + day_ms - param
    s.count = tonumber(redis.call('GET', KEYS[i]) or '0')
    s.cost = cost
    if mode == '1' and cost > 0 and s.count + cost > limit then
      allowed = 0
      if failing == 0 then failing, retry = i, s.day_end - now end
    end
  elseif kind == 'p' then
    local lease = ARGV[4 * i]
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    s.count = redis.call('ZCARD', KEYS[i])
    s.lease = lease
    if mode == '1' and lease ~= '' and s.count >= limit then
      allowed = 0
      local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
      if failing == 0 then failing, retry = i, tonumber(first[2]) - now end
    end
  end
  state[i] = s
end

local out = {allowed, failing, retry}
for i = 1, n do
  local s = state[i]
  local key = KEYS[i]
  local take = (mode == '1' and allowed == 1) or mode == 'r'
  if s.kind == 'b' then
    local level = s.level
    if take then
      if mode == 'r' then level = math.min(s.cap, level - s.cost) else level = level - s.cost end
      redis.call('HSET', key, 'l', string.format('%d', level), 't', string.format('%d', now))
      -- idle keys vanish once the bucket would be full again
      redis.call('PEXPIRE', key, math.max(1, math.ceil((s.cap - level) / s.limit)) + 1000)
    end
    out[#out + 1] = math.floor(math.max(0, level) / s.param)
    out[#out + 1] = math.ceil((s.cap - level) / s.limit)
  elseif s.kind == 'd' then
    local count = s.count
    if take and s.cost ~= 0 then
      count = redis.call('INCRBY', key, mode == 'r' and -s.cost or s.cost)
      redis.call('PEXPIREAT', key, s.day_end + 3600000)
    end
    out[#out + 1] = math.max(0, s.limit - count)
    out[#out + 1] = s.day_end - now
  else
    local count = s.count
    if take and s.lease ~= '' then
      if mode == 'r' then
        count = count - redis.call('ZREM', key, s.lease)
      else
        redis.call('ZADD', key, now + s.param, s.lease)
        redis.call('PEXPIRE', key, s.param + 1000)
        count = count + 1
      end
    end
    out[#out + 1] = math.max(0, s.limit - count)
    out[#out + 1] = 0
  end
end
return out

-- One throttle decision: check every limit of a request and take from all of
-- them or from none; or give back what a finished request over-took.
--
-- A scope is the account, or an API key with limits stricter than its
-- account's. Each scope has two keys, all under the account's hash tag
-- {account id} so the script runs on one Redis Cluster shard:
--   KEYS[2s-1]  hash: rl/rt requests bucket level/time, tl/tt tokens bucket
--               level/time, d/n calendar day number/messages counted that day
--   KEYS[2s]    sorted set of parallel leases: lease id -> expiry ms; a
--               cancelled lease id -> -(expiry ms) (a tombstone: negative, so
--               never counted as in flight nor renewed)
--
-- ARGV[1]  mode: "a" admit (check, then take all or none), "q" query (check,
--          take nothing), "r" return (correct tokens, release the lease, give
--          back a never-served request's message), "c" cancel a lease whose
--          admit or release reply was lost (a stall, a reset connection):
--          the lease is replaced by a tombstone, so an admit still queued
--          for it takes nothing when Redis finally runs it
-- ARGV[2]  the day zone's offset from UTC in ms now, ARGV[3] at the day's end
-- ARGV[4]  lease time-to-live ms
-- ARGV[5]  requests to take           ("r": unused)
-- ARGV[6]  tokens to take             ("r": the correction: actual - taken; a
--          negative one refunds, capped at a full bucket; a positive one is a
--          debt that may leave the level negative, so later requests wait)
-- ARGV[7]  the lease id ("" for none)
-- ARGV[8]  messages to take           ("r": the day number of the admission
--          whose message is given back, or "" for none)
-- ARGV[8+4(s-1)+1..4]  scope s's limits: requests/min, tokens/min, parallel,
--          messages/day; 0 = not limited in this scope
--
-- Time is the Redis server's (TIME), never a caller's clock, so every process
-- agrees. Buckets refill continuously; a level is kept scaled by the period
-- (units x 60,000 ms) so the refill, elapsed_ms x limit, is an exact integer.
-- Lua numbers are doubles: exact below 2^53, which config validation ensures.
--
-- Returns {allowed, deciding limit (4(s-1)+k, k = 1 requests, 2 tokens,
--   3 parallel, 4 messages; 0 = none), retry_after_ms, day number, then per
--   scope: requests remaining, requests reset ms, tokens remaining, tokens
--   reset ms, parallel remaining, messages remaining (-1 where not limited)};
--   modes "r" and "c" return {1, 0, 0, day number}.
--
-- Python reads these positions in one place only, throttle/script.py (Head,
-- decode): a change of the layout here changes it there.

local PERIOD = 60000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mode = ARGV[1]
local offset, offset_end = tonumber(ARGV[2]), tonumber(ARGV[3])
local day = math.floor((now + offset) / 86400000)
local day_end = (day + 1) * 86400000 - offset_end
local lease_ttl = tonumber(ARGV[4])
local lease = ARGV[7]
local scopes = #KEYS / 2

-- A bucket's level now: refilled since it was last written, at most full.
local function level_of(level, last, limit)
  level, last = tonumber(level), tonumber(last)
  local cap = limit * PERIOD
  if level == nil then return cap end
  if now > last then level = math.min(cap, level + (now - last) * limit) end
  return level
end

-- Until when a scope's hash is needed: its buckets refilled, its day over.
local function keep_ms(rl, rpm, tl, tpm, count)
  local ms = 0
  if rpm > 0 then ms = math.max(ms, math.ceil((rpm * PERIOD - rl) / rpm)) end
  if tpm > 0 then ms = math.max(ms, math.ceil((tpm * PERIOD - tl) / tpm)) end
  if count > 0 then ms = math.max(ms, day_end - now + 60000) end
  return ms + 1000
end

local function limits_of(s)
  local base = 8 + 4 * (s - 1)
  return tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]),
         tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
end

if mode == 'c' then
  -- Tombstones live a lease's lifetime: no admit waits in a queue longer.
  for s = 1, scopes do
    local _, _, par = limits_of(s)
    if par > 0 and lease ~= '' then
      redis.call('ZADD', KEYS[2 * s], -(now + lease_ttl), lease)
      redis.call('PEXPIRE', KEYS[2 * s], lease_ttl + 1000)
    end
  end
  return {1, 0, 0, day}
end

if mode == 'r' then
  local correction = tonumber(ARGV[6])
  local give_back = ARGV[8] ~= '' and tonumber(ARGV[8]) == day
  for s = 1, scopes do
    local hash, leases = KEYS[2 * s - 1], KEYS[2 * s]
    local rpm, tpm, par, per_day = limits_of(s)
    if (tpm > 0 and correction ~= 0) or (per_day > 0 and give_back) then
      local h = redis.call('HMGET', hash, 'rl', 'rt', 'tl', 'tt', 'd', 'n')
      local rl = rpm > 0 and level_of(h[1], h[2], rpm) or 0
      local tl = tpm > 0 and level_of(h[3], h[4], tpm) or 0
      local count = tonumber(h[5]) == day and tonumber(h[6]) or 0
      local fields = {}
      if tpm > 0 and correction ~= 0 then
        tl = math.min(tpm * PERIOD, tl - correction * PERIOD)
        fields = {'tl', string.format('%d', tl), 'tt', string.format('%d', now)}
      end
      if per_day > 0 and give_back and count > 0 then
        count = count - 1
        fields[#fields + 1] = 'n'
        fields[#fields + 1] = count
      end
      if #fields > 0 then
        redis.call('HSET', hash, unpack(fields))
        redis.call('PEXPIRE', hash, keep_ms(rl, rpm, tl, tpm, count))
      end
    end
    if par > 0 and lease ~= '' then redis.call('ZREM', leases, lease) end
  end
  return {1, 0, 0, day}
end

local need_requests = tonumber(ARGV[5]) * PERIOD
local need_tokens = tonumber(ARGV[6]) * PERIOD
local need_messages = tonumber(ARGV[8])
local allowed, deciding, retry = 1, 0, 0
local state = {}

-- A refusal's wait is the longest over every exhausted limit, so that a retry
-- after it finds all of them ready (if nothing else arrived meanwhile).
local function refuse(index, wait)
  allowed = 0
  if deciding == 0 or wait > retry then deciding, retry = index, wait end
end

for s = 1, scopes do
  local rpm, tpm, par, per_day = limits_of(s)
  local h = redis.call('HMGET', KEYS[2 * s - 1], 'rl', 'rt', 'tl', 'tt', 'd', 'n')
  local st = {rpm = rpm, tpm = tpm, par = par, per_day = per_day, rl = 0, tl = 0, count = 0}
  local base = 4 * (s - 1)
  if rpm > 0 then
    st.rl = level_of(h[1], h[2], rpm)
    if need_requests > 0 and st.rl < need_requests then
      refuse(base + 1, math.ceil((need_requests - st.rl) / rpm))
    end
  end
  if tpm > 0 then
    st.tl = level_of(h[3], h[4], tpm)
    if need_tokens > 0 and st.tl < need_tokens then
      refuse(base + 2, math.ceil((need_tokens - st.tl) / tpm))
    end
  end
  if par > 0 then
    st.in_flight = redis.call('ZCOUNT', KEYS[2 * s], '(' .. now, '+inf')
    if lease ~= '' and (st.in_flight >= par
        or (mode == 'a' and tonumber(redis.call('ZSCORE', KEYS[2 * s], lease) or 0) < 0)) then
      -- A slot frees when one of the caller's own requests ends, which no
      -- clock can promise; the earliest lease expiry is only the worst case.
      -- (A cancelled lease: its caller gave up on this admit long ago.)
      refuse(base + 3, 1000)
    end
  end
  if per_day > 0 then
    if tonumber(h[5]) == day then st.count = tonumber(h[6]) end
    if need_messages > 0 and st.count + need_messages > per_day then
      refuse(base + 4, day_end - now)
    end
  end
  state[s] = st
end

local take = mode == 'a' and allowed == 1
local out = {allowed, deciding, retry, day}
for s = 1, scopes do
  local st = state[s]
  local hash, leases = KEYS[2 * s - 1], KEYS[2 * s]
  if take then
    local fields = {}
    if st.rpm > 0 then
      st.rl = st.rl - need_requests
      fields = {'rl', string.format('%d', st.rl), 'rt', string.format('%d', now)}
    end
    if st.tpm > 0 then
      st.tl = st.tl - need_tokens
      fields[#fields + 1] = 'tl'
      fields[#fields + 1] = string.format('%d', st.tl)
      fields[#fields + 1] = 'tt'
      fields[#fields + 1] = string.format('%d', now)
    end
    if st.per_day > 0 then
      st.count = st.count + need_messages
      fields[#fields + 1] = 'd'
      fields[#fields + 1] = day
      fields[#fields + 1] = 'n'
      fields[#fields + 1] = st.count
    end
    if #fields > 0 then
      redis.call('HSET', hash, unpack(fields))
      -- An idle hash vanishes once nothing in it matters: a missing one reads
      -- as full buckets and no messages today, so nothing is lost.
      redis.call('PEXPIRE', hash, keep_ms(st.rl, st.rpm, st.tl, st.tpm, st.count))
    end
    if st.par > 0 and lease ~= '' then
      -- Expired leases (0 .. now) and expired tombstones (-now .. 0).
      redis.call('ZREMRANGEBYSCORE', leases, '(' .. (-now), now)
      redis.call('ZADD', leases, now + lease_ttl, lease)
      -- Every lease in the set expires within lease_ttl (renewals included).
      redis.call('PEXPIRE', leases, lease_ttl + 1000)
      st.in_flight = st.in_flight + 1
    end
  end
  if st.rpm > 0 then
    out[#out + 1] = math.floor(math.max(0, st.rl) / PERIOD)
    out[#out + 1] = math.ceil((st.rpm * PERIOD - st.rl) / st.rpm)
  else
    out[#out + 1] = -1
    out[#out + 1] = 0
  end
  if st.tpm > 0 then
    out[#out + 1] = math.floor(math.max(0, st.tl) / PERIOD)
    out[#out + 1] = math.ceil((st.tpm * PERIOD - st.tl) / st.tpm)
  else
    out[#out + 1] = -1
    out[#out + 1] = 0
  end
  out[#out + 1] = st.par > 0 and math.max(0, st.par - st.in_flight) or -1
  out[#out + 1] = st.per_day > 0 and math.max(0, st.per_day - st.count) or -1
end
return out

--[[
ratelimit.lua: check and charge several rate-limit buckets in one atomic step.

Two kinds of bucket:

"rate"        a GCRA ("generic cell rate algorithm") bucket: one stored value,
              the theoretical arrival time (TAT) in microseconds. It refills
              continuously at 1 unit per T microseconds up to `capacity` units;
              taking `cost` units moves its TAT forward by cost * T. A request
              is admitted when no bucket's TAT would run more than capacity * T
              ahead of now. GCRA rather than a (tokens, timestamp) token bucket:
              the same refill maths with one number per key, so one GET and one
              SET per bucket, and nothing to drift.
"concurrent"  in-flight requests: a sorted set of leases (member = lease id,
              score = expiry in microseconds). A request is admitted while
              fewer than `capacity` unexpired leases exist; it then holds a
              lease until it releases it (force mode, cost -1) or the lease
              expires, so a replica that dies mid-request frees its slots after
              the lease TTL instead of never.

KEYS[i]      the key of bucket i. Every key of one call must share a hash tag
             (the sidecar uses {llm-sidecar:rl}) so the script runs on Redis Cluster.
ARGV[1]      mode: "check"  admit only if every bucket admits; charge all or none
                   "force"  charge every bucket unconditionally (reconciliation
                            after the real usage is known, or a lease release;
                            cost may be negative)
ARGV[2]      idle grace in ms: a key expires this long after its bucket is full
             again (rate) or after its last lease expires (concurrent)
ARGV[3]      lease id of this request (concurrent buckets; any string otherwise)
ARGV[4]      lease TTL in ms (concurrent buckets)
then five values per bucket i, starting at ARGV[5 + (i - 1) * 5]:
  kind       "rate" or "concurrent"
  T          rate: microseconds per unit (the bucket's period / its amount), > 0
             concurrent: the retry hint in microseconds reported when full
  capacity   burst capacity (rate) or in-flight limit (concurrent), > 0
  cost       rate: units this request takes (>= 0 in "check" mode)
             concurrent: 1 takes a lease, -1 (force mode) releases it
  reserve    rate, "check" mode: units the caller would also like to take for
             later requests of its own (a reservation; 0: none). Granted in
             full or not at all, only if the request is admitted and the bucket
             still holds at least `reserve` more units afterwards, so the last
             units of a bucket are never parked on one replica. Ignored
             otherwise.

Returns an array: { admitted (1 or 0), now_us, then per bucket i:
  remaining  whole units (rate) or free slots (concurrent) left, after this
             request if admitted, else as it stands
  reset_us   rate: microseconds until the bucket is full again; concurrent: 0
  retry_us   0 if the bucket admits this cost; otherwise the wait until it
             would (concurrent: the hint T), or -1 if it never can (cost > capacity)
  reserved   units of the reservation granted (taken from the bucket and
             already counted in `remaining`) }

Time comes from Redis TIME, never from the callers' clocks.
]]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local force = ARGV[1] == 'force'
local grace_ms = tonumber(ARGV[2])
local lease = ARGV[3]
local lease_ttl_ms = tonumber(ARGV[4])

local n = #KEYS
local kinds, old, new, periods, caps, costs, retries, wants = {}, {}, {}, {}, {}, {}, {}, {}
local admitted = 1

for i = 1, n do
  local base = 5 + (i - 1) * 5
  local kind = ARGV[base]
  local T = tonumber(ARGV[base + 1])
  local cap = tonumber(ARGV[base + 2])
  local cost = tonumber(ARGV[base + 3])
  local retry = 0
  if kind == 'concurrent' then
    -- Leases of dead replicas lapse here, on the next call that looks.
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    local held = redis.call('ZCARD', KEYS[i])
    old[i], new[i] = held, held
    if cost > 0 then
      new[i] = held + 1
      if not force then
        if cap < 1 then
          retry = -1
          admitted = 0
        elseif held >= cap then
          retry = T
          admitted = 0
        end
      end
    elseif cost < 0 then
      new[i] = held - 1
    end
  else
    local tat = tonumber(redis.call('GET', KEYS[i])) or now
    if tat < now then tat = now end
    local next_tat = tat + cost * T
    if next_tat < now then next_tat = now end  -- a refund cannot overfill the bucket
    if not force and cost > 0 then
      local limit = now + cap * T
      if cost > cap then
        retry = -1
        admitted = 0
      elseif next_tat > limit then
        retry = math.ceil(next_tat - limit)
        admitted = 0
      end
    end
    old[i], new[i] = tat, next_tat
  end
  kinds[i], periods[i], caps[i], costs[i], retries[i] = kind, T, cap, cost, retry
  wants[i] = force and 0 or tonumber(ARGV[base + 4])
end

local out = { admitted, now }
for i = 1, n do
  local commit = admitted == 1 and costs[i] ~= 0
  if kinds[i] == 'concurrent' then
    local held = old[i]
    if commit then
      if costs[i] > 0 then
        local expiry = now + lease_ttl_ms * 1000
        redis.call('ZADD', KEYS[i], string.format('%.0f', expiry), lease)
        -- Only ever extend: the key must outlive every lease it holds.
        local ttl = lease_ttl_ms + grace_ms
        if redis.call('PTTL', KEYS[i]) < ttl then
          redis.call('PEXPIRE', KEYS[i], ttl)
        end
        held = redis.call('ZCARD', KEYS[i])
      else
        redis.call('ZREM', KEYS[i], lease)
        held = redis.call('ZCARD', KEYS[i])
      end
    end
    local free = caps[i] - held
    if free < 0 then free = 0 end
    out[#out + 1] = free
    out[#out + 1] = 0
    out[#out + 1] = retries[i]
    out[#out + 1] = 0
  else
    local tat = old[i]
    local granted = 0
    if admitted == 1 and wants[i] > 0 then
      local want = wants[i]
      -- Leave at least `want` units behind: near empty, every replica decides
      -- exactly, one request at a time.
      if new[i] + 2 * want * periods[i] <= now + caps[i] * periods[i] then
        granted = want
        new[i] = new[i] + want * periods[i]
        commit = true
      end
    end
    if commit then
      tat = new[i]
      -- Integer microseconds as text: tostring() would switch to exponent notation.
      redis.call('SET', KEYS[i], string.format('%.0f', tat),
                 'PX', math.ceil((tat - now) / 1000) + grace_ms)
    end
    -- +1 us: float rounding must not turn an exact whole unit into 0.99...
    local remaining = math.floor((now + caps[i] * periods[i] - tat + 1) / periods[i])
    if remaining < 0 then remaining = 0 end
    if remaining > caps[i] then remaining = caps[i] end  -- the +1 us with T < 1 us
    out[#out + 1] = remaining
    out[#out + 1] = math.ceil(tat - now)
    out[#out + 1] = retries[i]
    out[#out + 1] = granted
  end
end
return out

--[[
ratelimit.lua: check and charge several rate-limit buckets in one atomic step.

Each bucket is a GCRA ("generic cell rate algorithm") bucket: one stored value,
the theoretical arrival time (TAT) in microseconds. A bucket refills
continuously at 1 unit per T microseconds up to `capacity` units; taking
`cost` units moves its TAT forward by cost * T. A request is admitted when no
bucket's TAT would run more than capacity * T ahead of now. GCRA rather than a
(tokens, timestamp) token bucket: the same refill maths with one number per
key, so one GET and one SET per bucket, and nothing to drift.

KEYS[i]      the key of bucket i. Every key of one call must share a hash tag
             (the sidecar uses {llm-sidecar:rl}) so the script runs on Redis Cluster.
ARGV[1]      mode: "check"  admit only if every bucket admits; charge all or none
                   "force"  charge every bucket unconditionally (reconciliation
                            after the real usage is known; cost may be negative)
ARGV[2]      idle grace in ms: a key expires this long after its bucket is full again
then three values per bucket i, starting at ARGV[3 + (i - 1) * 3]:
  T          microseconds per unit (the bucket's period / its amount); > 0
  capacity   burst capacity in units; > 0
  cost       units this request takes (>= 0 in "check" mode)

Returns an array: { admitted (1 or 0), now_us, then per bucket i:
  remaining  whole units left (after this request if admitted, else as it stands)
  reset_us   microseconds until the bucket is full again
  retry_us   0 if the bucket admits this cost; otherwise the wait until it
             would, or -1 if it never can (cost > capacity) }

Time comes from Redis TIME, never from the callers' clocks.
]]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local force = ARGV[1] == 'force'
local grace_ms = tonumber(ARGV[2])

local n = #KEYS
local old, new, periods, caps, costs, retries = {}, {}, {}, {}, {}, {}
local admitted = 1

for i = 1, n do
  local base = 3 + (i - 1) * 3
  local T = tonumber(ARGV[base])
  local cap = tonumber(ARGV[base + 1])
  local cost = tonumber(ARGV[base + 2])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  local next_tat = tat + cost * T
  if next_tat < now then next_tat = now end  -- a refund cannot overfill the bucket
  local retry = 0
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
  old[i], new[i], periods[i], caps[i], costs[i], retries[i] = tat, next_tat, T, cap, cost, retry
end

local out = { admitted, now }
for i = 1, n do
  local tat = old[i]
  if admitted == 1 and costs[i] ~= 0 then
    tat = new[i]
    -- Integer microseconds as text: tostring() would switch to exponent notation.
    redis.call('SET', KEYS[i], string.format('%.0f', tat),
               'PX', math.ceil((tat - now) / 1000) + grace_ms)
  end
  local remaining = math.floor((now + caps[i] * periods[i] - tat) / periods[i])
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = remaining
  out[#out + 1] = math.ceil(tat - now)
  out[#out + 1] = retries[i]
end
return out

-- Rate limits: check every rule of one request, then charge all of them or none.
--
-- KEYS[i]   rule i's state, a hash (all KEYS share one hash tag, so this runs on Cluster)
-- ARGV[1]   "charge" | "peek" | "refund"
-- ARGV[2]   now in Unix ms, or "" for the server's clock (TIME). Only tests pass a time: in
--           production every replica asks Redis, so skewed replica clocks agree.
-- ARGV[3 + 6(i-1) ...]  rule i, six values: alg, a, b, c, cost, window
--   alg "f" fixed window     a = limit, b = period ms (0 = calendar month in UTC), c = 0
--   alg "s" sliding window   a = limit, b = period ms (0 = calendar month in UTC), c = 0
--   alg "t" token bucket     a = capacity, b = refill units R, c = scale P: R/P tokens per ms,
--                            the level is kept in 1/P tokens, so no refill is ever rounded
--   window: the window id a charge returned (refund mode only; 0 otherwise)
--
-- "charge" returns {now, admitted (1|0), then per rule: allowed (1|0), remaining,
--   reset_after_ms, retry_after_ms, window_ms, window id}. Every rule is checked before any
--   is written: a request that one rule rejects is charged to no rule.
-- "peek" answers exactly what "charge" would and writes nothing (no state created, no TTL
--   touched): the admin's usage view. Each rule's remaining is then what is left before the
--   request; a charge admitted at that instant answers remaining - cost.
-- "refund" gives back each rule's `cost` charged in `window` (the other half of a request
--   whose rules span several Cluster slots and that another slot rejected); returns {now}.
--
-- extproc/core/ratelimit.py is the same algorithm in Python (the memory store runs it and the
-- contract tests hold this script to it, operation for operation): change both together.
-- All arithmetic is on integers below 2^53, which Lua's doubles hold exactly (core validates
-- every Limit for that), and values are written with %.0f, never tostring's %.14g.
local PPM = 1000000
local DAY = 86400000
local floor = math.floor

local function fmt(x)
  return string.format('%.0f', x)
end

local function ceil_div(a, b)
  return -floor(-a / b)
end

-- days since 1970-01-01 -> year, month (H. Hinnant's civil_from_days)
local function civil(z)
  z = z + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then
    y = y + 1
  end
  return y, m
end

-- year, month -> days since 1970-01-01 of its first day (days_from_civil)
local function first_day(y, m)
  if m <= 2 then
    y = y - 1
  end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + floor((153 * mp + 2) / 5)
  return era * 146097 + doe - 719468
end

-- the window holding t: id, start, end (exclusive); period 0 = the calendar month in UTC
local function window(period, t)
  if period > 0 then
    local id = floor(t / period)
    return id, id * period, id * period + period
  end
  local y, m = civil(floor(t / DAY))
  local ny, nm = y, m + 1
  if nm > 12 then
    ny, nm = y + 1, 1
  end
  return y * 12 + m - 1, first_day(y, m) * DAY, first_day(ny, nm) * DAY
end

local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
end

-- -- fixed and sliding windows: state {w = window id, c = units in w, p = units in w - 1} --

local function load_window(r)
  local wid, start, stop = window(r.b, now)
  r.wid, r.start, r.stop, r.curr, r.prev = wid, start, stop, 0, 0
  local st = redis.call('HMGET', r.key, 'w', 'c', 'p')
  local w = tonumber(st[1])
  if w ~= nil then
    if w >= wid then        -- this window (or a later one: a clock stepped back)
      r.wid, r.curr = w, tonumber(st[2]) or 0
      if r.alg == 's' then
        r.prev = tonumber(st[3]) or 0
      end
    elseif w == wid - 1 and r.alg == 's' then
      r.prev = tonumber(st[2]) or 0
    end
  end
  local length = stop - start
  r.weight = ceil_div((length - (now - start)) * PPM, length)
end

local function next_length(r)
  local _, start, stop = window(r.b, r.stop)
  return stop - start
end

local function estimate_ppm(r)
  return r.prev * r.weight + r.curr * PPM
end

local function window_fits(r)
  if r.alg == 'f' then
    return r.curr + r.cost <= r.a
  end
  return estimate_ppm(r) + r.cost * PPM <= r.a * PPM
end

local function window_charge(r)
  r.curr = r.curr + r.cost
  if r.alg == 'f' then
    redis.call('HSET', r.key, 'w', fmt(r.wid), 'c', fmt(r.curr))
    redis.call('PEXPIRE', r.key, fmt(r.stop - now))
  else
    redis.call('HSET', r.key, 'w', fmt(r.wid), 'c', fmt(r.curr), 'p', fmt(r.prev))
    redis.call('PEXPIRE', r.key, fmt(r.stop - now + next_length(r)))
  end
end

local function sliding_retry(r)
  local length, left = r.stop - r.start, r.stop - now
  if r.cost > r.a then
    return left + next_length(r)
  end
  local room = r.a - r.cost - r.curr
  if room >= 0 then
    local k = floor(room * PPM / r.prev)
    return length - floor(k * length / PPM) - (now - r.start)
  end
  local nxt = next_length(r)
  local k = floor((r.a - r.cost) * PPM / r.curr)
  return left + nxt - floor(k * nxt / PPM)
end

local function window_report(r, allowed)
  local left = r.stop - now
  local remaining, reset, retry
  if r.alg == 'f' then
    remaining = math.max(0, r.a - r.curr)
    reset = 0
    if r.curr > 0 then
      reset = left
    end
    retry = left
  else
    remaining = math.max(0, floor((r.a * PPM - estimate_ppm(r)) / PPM))
    reset = 0
    if r.curr > 0 then
      reset = left + next_length(r)
    elseif r.prev > 0 and r.weight > 0 then
      reset = left
    end
    if not allowed then
      retry = sliding_retry(r)
    end
  end
  if allowed then
    retry = 0
  end
  return remaining, reset, retry, r.stop - r.start, r.wid
end

-- -- token bucket: state {l = level in 1/P tokens, t = ms of that level, s = P} -------------

local function load_bucket(r)
  r.full = r.a * r.c
  r.level = r.full
  local st = redis.call('HMGET', r.key, 'l', 't', 's')
  if tonumber(st[3]) == r.c then
    local level = math.min(tonumber(st[1]) or r.full, r.full)
    local elapsed = math.max(0, now - (tonumber(st[2]) or now))
    local missing = r.full - level
    if missing > 0 then
      if elapsed >= ceil_div(missing, r.b) then
        level = r.full
      else
        level = level + elapsed * r.b
      end
    end
    r.level = level
  end
  return st
end

local function bucket_save(r)
  redis.call('HSET', r.key, 'l', fmt(r.level), 't', fmt(now), 's', fmt(r.c))
  redis.call('PEXPIRE', r.key, fmt(ceil_div(r.full - r.level, r.b)))
end

local function bucket_report(r, allowed)
  local window_ms = ceil_div(r.full, r.b)
  local retry = 0
  if not allowed then
    if r.cost > r.a then
      retry = window_ms
    else
      retry = ceil_div(r.cost * r.c - r.level, r.b)
    end
  end
  return floor(r.level / r.c), ceil_div(r.full - r.level, r.b), retry, window_ms, 0
end

-- -- the request ----------------------------------------------------------------------------

local rules = {}
for i = 1, #KEYS do
  local at = 2 + (i - 1) * 6
  rules[i] = {key = KEYS[i], alg = ARGV[at + 1], a = tonumber(ARGV[at + 2]), b = tonumber(ARGV[at + 3]),
              c = tonumber(ARGV[at + 4]), cost = tonumber(ARGV[at + 5]), win = tonumber(ARGV[at + 6])}
end

if ARGV[1] == 'refund' then
  for _, r in ipairs(rules) do
    if r.alg == 't' then
      local st = load_bucket(r)
      if tonumber(st[3]) == r.c then
        r.level = math.min(r.full, r.level + r.cost * r.c)
        if r.level >= r.full then
          redis.call('DEL', r.key)
        else
          bucket_save(r)
        end
      end
    else
      local st = redis.call('HMGET', r.key, 'w', 'c', 'p')
      local w = tonumber(st[1])
      if w ~= nil and w == r.win then
        redis.call('HSET', r.key, 'c', fmt(math.max(0, (tonumber(st[2]) or 0) - r.cost)))
      elseif w ~= nil and w == r.win + 1 and r.alg == 's' then
        redis.call('HSET', r.key, 'p', fmt(math.max(0, (tonumber(st[3]) or 0) - r.cost)))
      end
    end
  end
  return {now}
end

local admitted = true
for _, r in ipairs(rules) do
  if r.alg == 't' then
    load_bucket(r)
    r.fits = r.level >= r.cost * r.c
  else
    load_window(r)
    r.fits = window_fits(r)
  end
  admitted = admitted and r.fits
end

-- "peek" stops before the only writes ("charge"'s), and reports the same
if admitted and ARGV[1] ~= 'peek' then
  for _, r in ipairs(rules) do
    if r.alg == 't' then
      r.level = r.level - r.cost * r.c
      bucket_save(r)
    else
      window_charge(r)
    end
  end
end

local reply = {now, admitted and 1 or 0}
for _, r in ipairs(rules) do
  local remaining, reset, retry, window_ms, wid
  if r.alg == 't' then
    remaining, reset, retry, window_ms, wid = bucket_report(r, r.fits)
  else
    remaining, reset, retry, window_ms, wid = window_report(r, r.fits)
  end
  reply[#reply + 1] = r.fits and 1 or 0
  reply[#reply + 1] = remaining
  reply[#reply + 1] = reset
  reply[#reply + 1] = retry
  reply[#reply + 1] = window_ms
  reply[#reply + 1] = wid
end
return reply

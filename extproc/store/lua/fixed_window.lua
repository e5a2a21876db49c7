-- Fixed-window hit: charge ARGV[3] (cost) against ARGV[1] (limit) in the window at KEYS[1].
--
-- KEYS[1]  the window's counter (its TTL is the rest of the window)
-- ARGV[1]  limit      (integer >= 0)
-- ARGV[2]  window_ms  (integer >= 1)
-- ARGV[3]  cost       (integer >= 1)
-- Returns {allowed (1|0), count after the hit, ms until the window resets}.
--
-- Atomic because Redis runs a script alone: concurrent hits from every replica are
-- serialised here, so exactly `limit` units are admitted per window. A rejected hit is not
-- charged (the counter is only written when the hit fits). The window starts at the first
-- admitted hit: the key is created with PX window_ms and later hits keep that expiry.
-- MemoryStore.fixed_window_hit mirrors this line by line; change both together.
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])

local raw = redis.call('GET', KEYS[1])
local count = 0
if raw then
  count = tonumber(raw)
  if count == nil or count ~= math.floor(count) then
    return redis.error_reply('ERR fixed window counter is not an integer')
  end
end

local ttl = redis.call('PTTL', KEYS[1])

if count + cost > limit then
  if ttl < 0 then
    ttl = window   -- no window running (-2) or a counter without expiry (-1)
  end
  return {0, count, ttl}
end

if raw == false or ttl < 0 then
  -- first hit of a window, or a counter that somehow lost its TTL: (re)start the window
  redis.call('SET', KEYS[1], count + cost, 'PX', window)
  return {1, count + cost, window}
end

return {1, redis.call('INCRBY', KEYS[1], cost), ttl}

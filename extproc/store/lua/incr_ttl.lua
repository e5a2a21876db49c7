-- Counter increment that sets an expiry only when it creates the key.
--
-- KEYS[1]  the counter
-- ARGV[1]  amount (integer)
-- ARGV[2]  ttl_ms (integer >= 1), applied only if KEYS[1] did not exist
-- Returns the new value. INCRBY keeps an existing key's TTL, so a live counter's expiry
-- never moves; doing EXISTS + INCRBY + PEXPIRE in one script makes "created by this call"
-- exact even when replicas race to create the same counter.
local created = redis.call('EXISTS', KEYS[1]) == 0
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if created then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value

-- Circuit breaker transition: apply ARGV[1] (op) to the breaker record at KEYS[1] (a hash).
--
-- KEYS[1]  the breaker's hash: s t c p k v f w (see extproc/core/breaker.py)
-- ARGV     op, now_ms, consecutive, window, window_ms, open_ms, probes, close_after, ttl_ms
-- Returns  {state, opened_at_ms, version, outcome, consecutive, forced, previous, retry_after_ms}
--
-- extproc/core/breaker.py `step()` mirrors this line by line (the memory store and each
-- replica's local fallback run it); the contract tests run the same cases on both. Atomic
-- because Redis runs a script alone: every replica's failures, probes and forcings are
-- serialised here, so thresholds and probe slots are exact for the whole fleet.
local op = ARGV[1]
local now = tonumber(ARGV[2])
local consecutive = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local window_ms = tonumber(ARGV[5])
local open_ms = tonumber(ARGV[6])
local probes = tonumber(ARGV[7])
local close_after = tonumber(ARGV[8])
local ttl_ms = tonumber(ARGV[9])

local raw = redis.call('HMGET', KEYS[1], 's', 't', 'c', 'p', 'k', 'v', 'f', 'w')
local s = tonumber(raw[1]) or 0
local t = tonumber(raw[2]) or 0
local c = tonumber(raw[3]) or 0
local pr = tonumber(raw[4]) or 0
local k = tonumber(raw[5]) or 0
local v = tonumber(raw[6]) or 0
local f = tonumber(raw[7]) or 0
local w = {}
if raw[8] and raw[8] ~= '' then
  for x in string.gmatch(raw[8], '[^,]+') do w[#w + 1] = tonumber(x) end
end
local prev = s
local outcome = 0
local retry = 0

local function open_now()
  s, t, pr, k, c, w = 1, now, 0, 0, 0, {}
  v = v + 1
end

local function close_now()
  if s ~= 0 then v = v + 1 end
  s, pr, k, c, w = 0, 0, 0, 0, {}
end

if op == 'force_open' then
  f = 1
  if s ~= 1 then open_now() end
elseif op == 'force_close' then
  f = 2
  close_now()
elseif op == 'reset' then
  f = 0
  close_now()
elseif op == 'read' then
  -- nothing
elseif f == 1 then
  if op == 'acquire' then outcome, retry = 2, open_ms end
elseif f == 2 then
  if op == 'acquire' then outcome = 0 end
elseif op == 'acquire' then
  if s == 1 and now >= t + open_ms then
    s, pr, k, t = 2, 0, 0, now
    v = v + 1
  elseif s == 2 and pr >= probes and now >= t + open_ms then
    pr = 0   -- probes claimed an open duration ago never reported: free their slots
  end
  if s == 0 then
    outcome = 0
  elseif s == 1 then
    outcome, retry = 2, t + open_ms - now
  elseif pr < probes then
    pr = pr + 1
    t = now  -- in half-open, t is the last probe claim
    outcome = 1
  else
    outcome, retry = 2, 1000
  end
elseif op == 'probe_failure' then
  if s == 2 then open_now() end
elseif op == 'failure' then
  if s == 0 then
    c = c + 1
    if window > 0 then
      local kept = {}
      for _, x in ipairs(w) do
        if x > now - window_ms then kept[#kept + 1] = x end
      end
      kept[#kept + 1] = now
      local limit = math.min(window, 1000)
      local first = math.max(1, #kept - limit + 1)
      w = {}
      for i = first, #kept do w[#w + 1] = kept[i] end
    end
    if (consecutive > 0 and c >= consecutive) or (window > 0 and #w >= window) then
      open_now()
    end
  end
elseif op == 'success' then
  if s == 0 then c = 0 end
elseif op == 'probe_success' then
  if s == 2 then
    pr = math.max(0, pr - 1)
    k = k + 1
    if k >= close_after then close_now() end
  end
elseif op == 'release' then
  if s == 2 then pr = math.max(0, pr - 1) end
elseif op == 'trip' then
  if s == 0 then open_now() end
else
  return redis.error_reply('ERR unknown breaker op')
end

local wtext = {}
for i, x in ipairs(w) do wtext[i] = string.format('%d', x) end
redis.call('HSET', KEYS[1], 's', s, 't', string.format('%d', t), 'c', c, 'p', pr, 'k', k, 'v', v, 'f', f,
           'w', table.concat(wtext, ','))
redis.call('PEXPIRE', KEYS[1], ttl_ms)
return {s, t, v, outcome, c, f, prev, math.max(0, retry)}

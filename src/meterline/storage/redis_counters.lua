-- Meterline's counter store in Redis: ONE script does a whole store call atomically, in this order:
--   f  finishes (settlements and releases, in the order the process made them)
--   s  seeds (set only absent counters)
--   h  holds to reserve (each all-or-nothing, in order)
--   l  lines whose levels to read
--   x  the expired-holds query (a limit), answered with the stored holds
--   t  a tally key: count one event in this minute and answer the events of the last 60 minutes
-- with n = now in seconds and u = now in microseconds (a string) from the caller's clock, never TIME.
-- It mirrors meterline/quotas/memory.py statement by statement; names below refer to it.
--
-- Exactness: Lua numbers are doubles, exact only up to 2^53, and amounts reach 10^18. So amounts,
-- maxima and counter values travel and are stored as decimal strings, and the script never uses a
-- reply of HINCRBY (a double). A string read with HMGET is split into two limbs, hi * 10^9 + lo, each
-- far below 2^53, so sums, differences and comparisons of values up to 2^63 (and beyond) are exact;
-- what is written back goes through `text` (limbs to decimal) into HINCRBY, Redis' own int64 arithmetic.
-- Seconds and microseconds (< 2^53) are plain numbers.
--
-- Atomicity: a script runs alone in Redis, so one call is one atomic step; a hold touches no counter
-- until every line has been checked. Needs Redis >= 6.2 (GETDEL); not for Redis Cluster (keys are
-- built here, not declared).
--
-- Keys (P = prefix):  P f:<key>  fixed window, hash {u = used, v = reserved, r = reset second}
--                     P r:<key>  rolling window, hash {h = horizon, t = total, o = oldest second,
--                                <second> = amount}; h is also the marker of a seeded, empty window
--                     P h:<id>   a hold: JSON [second reserved, [id, expires_us, lines, ttl]]
--                     P holds    sorted set of hold ids by expires_us (exact: < 2^53)
--                     P t:<key>  a tally, hash {<minute> = events} (memory.py: _tallies)

local req = cjson.decode(ARGV[1])
local P = ARGV[2]
local now_s = req.n
local ROLLING = 60
local ROLLING_TTL = 120
local B = 1000000000
local ZERO = {0, 0}
local HOLDS = P .. 'holds'

-- two-limb integers ---------------------------------------------------------------------------------
local function big(s)
  local negative = string.byte(s, 1) == 45
  if negative then s = string.sub(s, 2) end
  local n = #s
  local hi, lo = 0, tonumber(s)
  if n > 9 then
    hi = tonumber(string.sub(s, 1, n - 9))
    lo = tonumber(string.sub(s, n - 8))
  end
  if negative then
    if lo > 0 then return {-hi - 1, B - lo} end
    return {-hi, 0}
  end
  return {hi, lo}
end

local function add(a, b)
  local hi, lo = a[1] + b[1], a[2] + b[2]
  if lo >= B then return {hi + 1, lo - B} end
  return {hi, lo}
end

local function sub(a, b)
  local hi, lo = a[1] - b[1], a[2] - b[2]
  if lo < 0 then return {hi - 1, lo + B} end
  return {hi, lo}
end

local function cmp(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] and -1 or 1 end
  if a[2] ~= b[2] then return a[2] < b[2] and -1 or 1 end
  return 0
end

-- the argument of HINCRBY that takes `s` away ("-0" is not an integer to Redis)
local function negate(s)
  if s == '0' then return '0' end
  if string.byte(s, 1) == 45 then return string.sub(s, 2) end
  return '-' .. s
end

local function text(x)  -- back to a decimal string, for HINCRBY/HSET and for the answer
  local hi, lo = x[1], x[2]
  if hi < 0 then
    if lo > 0 then hi, lo = -hi - 1, B - lo else hi = -hi end
    return '-' .. text({hi, lo})
  end
  if hi == 0 then return string.format('%d', lo) end
  return string.format('%d%09d', hi, lo)
end

-- memory.refuses: past the maximum; an amount of zero is never refused
local function refuses(consumed, amount, maximum)
  return cmp(amount, ZERO) > 0 and cmp(add(consumed, amount), maximum) > 0
end

-- counters -------------------------------------------------------------------------------------------
-- Each counter is read once per call into `cache` and from then on kept in step with every write this
-- call makes (nothing else can write while a script runs). A finish that reads the counters of the
-- previous request leaves them cached for the reservation that follows in the same call.
local cache = {}

local function load(line)  -- state, redis key; state is false when the store does not hold it
  local key = P .. (line[2] == 'f' and 'f:' or 'r:') .. line[1]
  local state = cache[key]
  if state ~= nil then return state, key end
  if line[2] == 'f' then
    local raw = redis.call('HMGET', key, 'u', 'v', 'r')
    state = raw[1] and {u = big(raw[1]), v = big(raw[2]), r = tonumber(raw[3])} or false
  else
    local raw = redis.call('HMGET', key, 'h', 't', 'o')
    state = raw[1] and {h = tonumber(raw[1]), t = big(raw[2]), o = raw[3] and tonumber(raw[3]) or nil} or false
  end
  cache[key] = state
  return state, key
end

-- memory.py Rolling.prune. Only a rising horizon can drop buckets, and only once it reaches the oldest one, so
-- the scan of the whole hash runs about once a second per key.
local function prune(state, key)
  local horizon = now_s - ROLLING
  if horizon <= state.h then return end
  state.h = horizon
  if not (state.o and state.o <= horizon) then
    redis.call('HSET', key, 'h', horizon)
    return
  end
  local fields = redis.call('HGETALL', key)
  local gone, oldest = {}, nil
  for i = 1, #fields, 2 do
    local second = tonumber(fields[i])  -- nil for h, t, o
    if second and second <= horizon then
      gone[#gone + 1] = fields[i]
      state.t = sub(state.t, big(fields[i + 1]))
    elseif second and (not oldest or second < oldest) then
      oldest = second
    end
  end
  if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
  state.o = oldest
  if oldest then
    redis.call('HSET', key, 'h', horizon, 't', text(state.t), 'o', oldest)
  else
    redis.call('HSET', key, 'h', horizon, 't', text(state.t))
    redis.call('HDEL', key, 'o')
  end
end

-- memory.py Rolling.add; true when it wrote
local function rolling_add(state, key, second, amount)
  if cmp(amount, ZERO) == 0 or second <= state.h then return false end
  local delta = text(amount)
  redis.call('HINCRBY', key, second, delta)  -- creates the bucket or adds to it
  redis.call('HINCRBY', key, 't', delta)
  state.t = add(state.t, amount)
  if not state.o or second < state.o then  -- a new oldest bucket (it cannot have existed)
    redis.call('HSET', key, 'o', second)
    state.o = second
  end
  return true
end

-- memory.py Rolling.retry_after (the key is pruned)
local function rolling_retry_after(state, key, amount, maximum)
  if cmp(amount, maximum) > 0 then return ROLLING end
  local wanted = add(state.t, amount)
  local over = cmp(wanted, maximum) > 0
  local excess = sub(wanted, maximum)
  local fields = redis.call('HGETALL', key)
  local buckets = {}
  for i = 1, #fields, 2 do
    local second = tonumber(fields[i])
    if second then buckets[#buckets + 1] = {second, fields[i + 1]} end
  end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  for _, bucket in ipairs(buckets) do
    local value = big(bucket[2])
    excess = sub(excess, value)
    if cmp(excess, ZERO) <= 0 and (over or cmp(value, ZERO) > 0) then
      return math.max(bucket[1] + ROLLING - now_s, 1)
    end
  end
  return ROLLING
end

-- A level travels as {consumed, reset_s}, consumed as a decimal string.
local function level(line)
  local state, key = load(line)
  if line[2] == 'f' then return {text(add(state.u, state.v)), state.r} end
  prune(state, key)
  return {text(state.t), state.o and state.o + ROLLING or now_s}
end

local function levels(lines)
  local out = {}
  for i, line in ipairs(lines) do out[i] = level(line) end
  return out
end

-- reserve: one hold is [id, expires_us, lines, ttl_s]; a line is [key, kind, amount, maximum, block, reset]
local function reserve(hold)
  local hk = P .. 'h:' .. hold[1]
  -- Claim the id first (one command instead of EXISTS + SET); given back unless admitted.
  if not redis.call('SET', hk, cjson.encode({now_s, hold}), 'EX', hold[4], 'NX') then return nil end
  local lines = hold[3]
  local states, keys, missing = {}, {}, {}
  for i, line in ipairs(lines) do
    states[i], keys[i] = load(line)
    if not states[i] then missing[#missing + 1] = i - 1 end
  end
  if #missing > 0 then
    redis.call('DEL', hk)
    return {2, missing}
  end
  local overage, consumed = 0, {}
  for i, line in ipairs(lines) do
    local state = states[i]
    if line[2] == 'f' then
      consumed[i] = add(state.u, state.v)
    else
      prune(state, keys[i])
      consumed[i] = state.t
    end
    local amount, maximum = big(line[3]), big(line[4])
    if maximum[1] >= 0 and refuses(consumed[i], amount, maximum) then
      if line[5] == 1 then
        redis.call('DEL', hk)
        local retry
        if line[2] == 'f' then
          retry = math.max(state.r - now_s, 1)
        else
          retry = rolling_retry_after(state, keys[i], amount, maximum)
        end
        return {3, i - 1, retry, levels(lines)}
      end
      overage = 1
    end
  end
  -- As memory.py: each line's level is its consumption as checked plus its own amount; the reset is
  -- read after this line's write.
  local after = {}
  for i, line in ipairs(lines) do
    local state, amount = states[i], big(line[3])
    if line[2] == 'f' then
      if line[3] ~= '0' then
        redis.call('HINCRBY', keys[i], 'v', line[3])
        state.v = add(state.v, amount)
      end
      after[i] = {text(add(consumed[i], amount)), state.r}
    else
      if rolling_add(state, keys[i], now_s, amount) then redis.call('EXPIRE', keys[i], ROLLING_TTL) end
      after[i] = {text(add(consumed[i], amount)), state.o and state.o + ROLLING or now_s}
    end
  end
  redis.call('ZADD', HOLDS, hold[2], hold[1])
  return {1, overage, after}
end

-- settle / release: [id] releases, [id, actuals] settles; unknown holds are skipped. A settlement does
-- not refresh a rolling key's TTL: it only adjusts a bucket its own reservation wrote (and refreshed).
local function finish(item, malformed)
  local stored = redis.call('GETDEL', P .. 'h:' .. item[1])
  if not stored then return end
  redis.call('ZREM', HOLDS, item[1])
  local held = cjson.decode(stored)
  local second, lines, actual = held[1], held[2][3], item[2]
  if actual and #actual ~= #lines then
    malformed[#malformed + 1] = item[1]  -- memory raises ValueError after dropping the hold
    return
  end
  for i, line in ipairs(lines) do
    local spent = actual and actual[i] or '0'
    local state, key = load(line)
    if state and line[2] == 'f' then
      if line[3] ~= '0' then
        redis.call('HINCRBY', key, 'v', negate(line[3]))
        state.v = sub(state.v, big(line[3]))
      end
      if spent ~= '0' then
        redis.call('HINCRBY', key, 'u', spent)
        state.u = add(state.u, big(spent))
      end
    elseif state then
      rolling_add(state, key, second, sub(big(spent), big(line[3])))
    end
  end
end

-- seed: [key, kind, reset, used, buckets, ttl_s]; present counters are left alone
local function seed(item)
  local state, key = load(item)
  if state then return end
  if item[2] == 'f' then
    redis.call('HSET', key, 'u', item[4], 'v', '0', 'r', item[3])
    redis.call('EXPIRE', key, item[6])
    cache[key] = {u = big(item[4]), v = ZERO, r = item[3]}
    return
  end
  redis.call('HSET', key, 'h', 0, 't', '0')
  state = {h = 0, t = ZERO}
  cache[key] = state
  for _, bucket in ipairs(item[5]) do
    if bucket[1] > now_s - ROLLING then rolling_add(state, key, bucket[1], big(bucket[2])) end
  end
  redis.call('EXPIRE', key, ROLLING_TTL)
end

-- expired: oldest first; ids whose hold key has outlived its TTL are dropped from the index
local function expired(limit)
  local out = {}
  local bound = '(' .. req.u
  while #out < limit do
    local ids = redis.call('ZRANGEBYSCORE', HOLDS, '-inf', bound, 'LIMIT', #out, limit - #out)
    local gone = 0
    for _, id in ipairs(ids) do
      local stored = redis.call('GET', P .. 'h:' .. id)
      if stored then out[#out + 1] = stored else
        redis.call('ZREM', HOLDS, id)
        gone = gone + 1
      end
    end
    if gone == 0 then break end
  end
  return out
end

-- tallies (memory.py: tally) -------------------------------------------------------------------------
local TALLY_MINUTES = 60
local function tally(key)
  local tk = P .. 't:' .. key
  local minute = math.floor(now_s / 60)
  redis.call('HINCRBY', tk, tostring(minute), 1)
  local fields = redis.call('HGETALL', tk)
  local total = 0
  for i = 1, #fields, 2 do
    if tonumber(fields[i]) <= minute - TALLY_MINUTES then
      redis.call('HDEL', tk, fields[i])
    else
      total = total + tonumber(fields[i + 1])
    end
  end
  redis.call('EXPIRE', tk, (TALLY_MINUTES + 1) * 60)
  return total
end

-- one call ------------------------------------------------------------------------------------------
local answer = {}
local malformed = {}
for _, item in ipairs(req.f) do finish(item, malformed) end
if #malformed > 0 then answer.b = malformed end
if req.s then for _, item in ipairs(req.s) do seed(item) end end
if req.h then
  local verdicts = {}
  for i, hold in ipairs(req.h) do
    local verdict = reserve(hold)
    if not verdict then
      answer.d = i - 1
      break
    end
    verdicts[i] = verdict
  end
  answer.v = verdicts
end
if req.l then
  local read = {}
  for i, line in ipairs(req.l) do
    read[i] = load(line) and level(line) or 0
  end
  answer.l = read
end
if req.x then answer.x = expired(req.x) end
if req.t then answer.t = tally(req.t) end
return cjson.encode(answer)

-- Meterline's counter store in Redis: ONE script does a whole store call atomically, in this order:
--   f  finishes (settlements and releases, in the order the process made them)
--   s  seeds (set only absent counters)
--   h  holds to reserve (each all-or-nothing, in order)
--   l  lines whose levels to read
--   d  holds to describe (their stored records, for a process that finishes a hold it did not make)
--   x  the expired-holds query (per holds hash, a limit), answered with the stored holds
--   t  a tally: count one event in this minute and answer the events of the last 60 minutes
-- with n = now in seconds and u = now in microseconds (a string) from the caller's clock, never TIME.
-- It mirrors meterline/quotas/memory.py (CounterBook) statement by statement; names below refer to it.
--
-- Keys: every key the script touches is in KEYS, and requests name keys by their index there. The
-- client builds the names (storage/redis_counters.py); all keys of one group (an organization) share a
-- hash tag, so with Redis Cluster one call is one slot. Per group G (P = the prefix):
--   P{G}f:<reset second>  fixed windows ending at that second: a hash, field = counter key,
--                         value = "<used> <reserved>" (decimal); the whole hash expires a day after
--   P{G}r:<key>           a rolling window: hash {h = horizon, t = total, o = oldest second,
--                         <second> = amount}; h is also the marker of a seeded, empty window
--   P{G}h                 the group's holds: field = hold id, value = the record the client made,
--                         "[expires_us, second reserved, lines]"
--   P{G}t:<key>           a tally, hash {<minute> = events}
--
-- Cost: Redis time per decision is what bounds one Redis, so a call reads each hash once (HMGET of every
-- field it needs, gathered first) and writes each once (one HSET at the end); it never encodes JSON
-- for storage (the client sends the record as it is stored) and decodes a record only to finish it.
--
-- Exactness: Lua numbers are doubles, exact only up to 2^53, and amounts reach 10^18. So amounts,
-- maxima and counter values travel and are stored as decimal strings; a string read is split into two
-- limbs, hi * 10^9 + lo, each far below 2^53, so sums, differences and comparisons of values up to
-- 2^63 (and beyond) are exact, and values go back to decimal strings (`text`) to be stored.
-- Seconds and microseconds (< 2^53) are plain numbers.
--
-- Atomicity: a script runs alone in Redis, so one call is one atomic step; a hold touches no counter
-- until every line has been checked. Needs Redis >= 7.0 (EXPIRE ... NX/GT).

local req = cjson.decode(ARGV[1])
local now_s = req.n
local ROLLING = 60
local ROLLING_TTL = 120
local FORGET = 86400
local B = 1000000000
local ZERO = {0, 0}

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

local function text(x)  -- back to a decimal string, to store and to answer
  local hi, lo = x[1], x[2]
  if hi < 0 then
    if lo > 0 then hi, lo = -hi - 1, B - lo else hi = -hi end
    return '-' .. text({hi, lo})
  end
  if hi == 0 then return string.format('%d', lo) end
  return string.format('%d%09d', hi, lo)
end

-- counters ------------------------------------------------------------------------------------------
-- A line travels as [key index, field, kind, amount, maximum, block, reset]: field is the counter key
-- for a fixed window (its hash holds the window's counters) and 0 for a rolling one (its own hash).
-- Each counter is read once per call (all of a hash's fields in one HMGET, before anything else) and
-- kept here in step with every change this call makes; changes are written once, at the end.
local fixed = {}      -- [key index][field] = {u, v} or false (absent)
local fixed_out = {}  -- [key index][field] = true: to write
local rolls = {}      -- [key index] = {h, t, o, b = {[second] = amount}, fresh} or false (absent)
local roll_out = {}   -- [key index][field] = true: to write (h, t, o or a second)
local refresh = {}    -- [key index] = seconds: EXPIRE at the end

local function want_fixed(wanted, line)
  local fields = wanted[line[1]]
  if not fields then
    fields = {}
    wanted[line[1]] = fields
  end
  fields[line[2]] = true
end

local function gather(wanted_fixed, wanted_rolls, line)
  if line[3] == 'f' then want_fixed(wanted_fixed, line) else wanted_rolls[line[1]] = true end
end

local function read_all(wanted_fixed, wanted_rolls)
  for index, fields in pairs(wanted_fixed) do
    local names = {}
    for name in pairs(fields) do names[#names + 1] = name end
    local raw = redis.call('HMGET', KEYS[index], unpack(names))
    local states = {}
    for i, name in ipairs(names) do
      local value = raw[i]
      if value then
        local space = string.find(value, ' ', 1, true)
        states[name] = {big(string.sub(value, 1, space - 1)), big(string.sub(value, space + 1))}
      else
        states[name] = false
      end
    end
    fixed[index] = states
    fixed_out[index] = {}
  end
  for index in pairs(wanted_rolls) do
    local raw = redis.call('HMGET', KEYS[index], 'h', 't', 'o', now_s)
    if raw[1] then
      local state = {h = tonumber(raw[1]), t = big(raw[2]), o = raw[3] and tonumber(raw[3]) or nil, b = {}}
      if raw[4] then state.b[now_s] = big(raw[4]) else state.b[now_s] = false end
      rolls[index] = state
    else
      rolls[index] = false
    end
    roll_out[index] = {}
  end
end

local function fixed_state(line)
  return fixed[line[1]][line[2]]
end

local function fixed_touch(line)
  fixed_out[line[1]][line[2]] = true
end

-- writes the changes of one rolling key so far (before a scan of its hash, and at the end)
local function roll_write(index)
  local state, out = rolls[index], roll_out[index]
  if not state or not next(out) then return end
  local args = {}
  for name in pairs(out) do
    local value
    if name == 'h' then value = state.h
    elseif name == 't' then value = text(state.t)
    elseif name == 'o' then value = state.o
    else value = text(state.b[name]) end
    args[#args + 1] = name
    args[#args + 1] = value
  end
  redis.call('HSET', KEYS[index], unpack(args))
  roll_out[index] = {}
end

-- the amount in one second's bucket, or nil when there is none
local function bucket(state, index, second)
  local value = state.b[second]
  if value == nil then
    if state.fresh then
      value = false
    else
      local raw = redis.call('HGET', KEYS[index], second)
      value = raw and big(raw) or false
    end
    state.b[second] = value
  end
  return value or nil
end

-- memory.py Rolling.prune. Only a rising horizon can drop buckets, and only once it reaches the oldest
-- one, so the scan of the whole hash runs about once a second per key.
local function prune(state, index)
  local horizon = now_s - ROLLING
  if horizon <= state.h then return end
  state.h = horizon
  roll_out[index].h = true
  if not (state.o and state.o <= horizon) then return end
  roll_write(index)
  local fields = redis.call('HGETALL', KEYS[index])
  local gone, oldest = {}, nil
  for i = 1, #fields, 2 do
    local second = tonumber(fields[i])  -- nil for h, t, o
    if second and second <= horizon then
      gone[#gone + 1] = fields[i]
      state.t = sub(state.t, big(fields[i + 1]))
      state.b[second] = false
    elseif second and (not oldest or second < oldest) then
      oldest = second
    end
  end
  if #gone > 0 then redis.call('HDEL', KEYS[index], unpack(gone)) end
  state.o = oldest
  roll_out[index].t = true
  if oldest then
    roll_out[index].o = true
  else
    redis.call('HDEL', KEYS[index], 'o')
  end
end

-- memory.py Rolling.add; true when it changed something
local function rolling_add(state, index, second, amount)
  if second <= state.h then return false end
  local value = bucket(state, index, second)
  if not value and cmp(amount, ZERO) == 0 then return false end
  state.b[second] = value and add(value, amount) or amount
  state.t = add(state.t, amount)
  local out = roll_out[index]
  out[second] = true
  out.t = true
  if not state.o or second < state.o then  -- a new oldest bucket (it cannot have existed)
    state.o = second
    out.o = true
  end
  return true
end

-- memory.py Rolling.retry_after (the key is pruned)
local function rolling_retry_after(state, index, amount, maximum)
  if cmp(amount, maximum) > 0 then return ROLLING end
  roll_write(index)
  local wanted = add(state.t, amount)
  local over = cmp(wanted, maximum) > 0
  local excess = sub(wanted, maximum)
  local fields = redis.call('HGETALL', KEYS[index])
  local buckets = {}
  for i = 1, #fields, 2 do
    local second = tonumber(fields[i])
    if second then buckets[#buckets + 1] = {second, fields[i + 1]} end
  end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  for _, entry in ipairs(buckets) do
    local value = big(entry[2])
    excess = sub(excess, value)
    if cmp(excess, ZERO) <= 0 and (over or cmp(value, ZERO) > 0) then
      return math.max(entry[1] + ROLLING - now_s, 1)
    end
  end
  return ROLLING
end

local function reset_of(state)
  return state.o and state.o + ROLLING or now_s
end

-- A level travels as {consumed, reset_s}, consumed as a decimal string.
local function level(line)
  if line[3] == 'f' then
    local state = fixed_state(line)
    return {text(add(state[1], state[2])), line[7]}
  end
  local state = rolls[line[1]]
  prune(state, line[1])
  return {text(state.t), reset_of(state)}
end

local function levels(lines)
  local out = {}
  for i, line in ipairs(lines) do out[i] = level(line) end
  return out
end

local function present(line)
  if line[3] == 'f' then return fixed_state(line) end
  return rolls[line[1]]
end

-- reserve: a hold is [holds key index, id, index of its record in ARGV, lines] (memory.py: reserve_one)
local function reserve(hold)
  local holds, id, lines = KEYS[hold[1]], hold[2], hold[4]
  -- Claim the id first (one command instead of HEXISTS + HSET); given back unless admitted.
  if redis.call('HSETNX', holds, id, ARGV[hold[3]]) == 0 then return nil end
  local missing = {}
  for i, line in ipairs(lines) do
    if not present(line) then missing[#missing + 1] = i - 1 end
  end
  if #missing > 0 then
    redis.call('HDEL', holds, id)
    return {2, missing}
  end
  local overage, refused, consumed, amounts = 0, nil, {}, {}
  for i, line in ipairs(lines) do
    local value
    if line[3] == 'f' then
      local state = fixed_state(line)
      value = add(state[1], state[2])
    else
      local state = rolls[line[1]]
      prune(state, line[1])
      value = state.t
    end
    consumed[i] = value
    local amount = big(line[4])
    amounts[i] = amount
    if string.byte(line[5], 1) ~= 45 and cmp(amount, ZERO) > 0 and cmp(add(value, amount), big(line[5])) > 0 then
      if line[6] == 0 then
        overage = 1
      elseif not refused then
        refused = i
      end
    end
  end
  if refused then
    redis.call('HDEL', holds, id)
    local line = lines[refused]
    local retry
    if line[3] == 'f' then
      retry = math.max(line[7] - now_s, 1)
    else
      retry = rolling_retry_after(rolls[line[1]], line[1], amounts[refused], big(line[5]))
    end
    return {3, refused - 1, retry, levels(lines)}
  end
  -- As memory.py: each line's level is its consumption as checked plus its own amount; the reset is
  -- read after this line's write.
  local after = {}
  for i, line in ipairs(lines) do
    local amount = amounts[i]
    if line[3] == 'f' then
      local state = fixed_state(line)
      if line[4] ~= '0' then
        state[2] = add(state[2], amount)
        fixed_touch(line)
      end
      after[i] = {text(add(consumed[i], amount)), line[7]}
    else
      local state = rolls[line[1]]
      if rolling_add(state, line[1], now_s, amount) then refresh[line[1]] = ROLLING_TTL end
      after[i] = {text(add(consumed[i], amount)), reset_of(state)}
    end
  end
  return {1, overage, after}
end

-- settle / release: [holds key index, id, actuals or 0, lines]; unknown holds are skipped. The lines
-- are the record's, with this call's key indices. A settlement does not refresh a rolling key's TTL:
-- it only adjusts a bucket its own reservation wrote (and refreshed).
local function finish(item, malformed)
  local holds, id = KEYS[item[1]], item[2]
  local stored = redis.call('HGET', holds, id)
  if not stored then return end
  redis.call('HDEL', holds, id)
  local record = cjson.decode(stored)
  local second, held, actual, lines = record[2], record[3], item[3], item[4]
  if actual ~= 0 and #actual ~= #held then
    malformed[#malformed + 1] = id  -- memory raises ValueError after dropping the hold
    return
  end
  for i, line in ipairs(lines) do
    local reserved = held[i][3]
    local spent = actual ~= 0 and actual[i] or '0'
    if line[3] == 'f' then
      local state = fixed_state(line)
      if state then
        if reserved ~= '0' then state[2] = sub(state[2], big(reserved)) end
        if spent ~= '0' then state[1] = add(state[1], big(spent)) end
        fixed_touch(line)
      end
    else
      local state = rolls[line[1]]
      if state then rolling_add(state, line[1], second, sub(big(spent), big(reserved))) end
    end
  end
end

-- seed: [key index, field, kind, reset, used, buckets, ttl_s]; present counters are left alone
local function seed(item)
  if present(item) then return end
  local index = item[1]
  if item[3] == 'f' then
    fixed[index][item[2]] = {big(item[5]), ZERO}
    fixed_touch(item)
    -- Every counter of the hash ends at the same second; NX sets a first lifetime, GT lengthens it.
    redis.call('EXPIRE', KEYS[index], item[7], 'NX')
    redis.call('EXPIRE', KEYS[index], item[7], 'GT')
    return
  end
  local state = {h = 0, t = ZERO, b = {}, fresh = true}
  rolls[index] = state
  roll_out[index].h = true
  roll_out[index].t = true
  for _, entry in ipairs(item[6]) do
    if entry[1] > now_s - ROLLING then rolling_add(state, index, entry[1], big(entry[2])) end
  end
  refresh[index] = ROLLING_TTL
end

-- expired: [holds key index, limit]: the group's holds whose lease ended, oldest first, each answered
-- as [id, record, the item's position]
local function expired(item, position, out)
  local bound = tonumber(req.u)
  local fields = redis.call('HGETALL', KEYS[item[1]])
  local due = {}
  for i = 1, #fields, 2 do
    local expires = tonumber(string.match(fields[i + 1], '^%[(%d+)'))
    if expires < bound then due[#due + 1] = {expires, fields[i], fields[i + 1]} end
  end
  table.sort(due, function(a, b) return a[1] < b[1] end)
  for i = 1, math.min(#due, item[2]) do out[#out + 1] = {due[i][2], due[i][3], position} end
end

-- tallies (memory.py: tally) -------------------------------------------------------------------------
local TALLY_MINUTES = 60
local function tally(index)
  local key = KEYS[index]
  local minute = math.floor(now_s / 60)
  redis.call('HINCRBY', key, tostring(minute), 1)
  local fields = redis.call('HGETALL', key)
  local total = 0
  for i = 1, #fields, 2 do
    if tonumber(fields[i]) <= minute - TALLY_MINUTES then
      redis.call('HDEL', key, fields[i])
    else
      total = total + tonumber(fields[i + 1])
    end
  end
  redis.call('EXPIRE', key, (TALLY_MINUTES + 1) * 60)
  return total
end

-- one call ------------------------------------------------------------------------------------------
local wanted_fixed, wanted_rolls = {}, {}
for _, item in ipairs(req.f) do
  for _, line in ipairs(item[4]) do gather(wanted_fixed, wanted_rolls, line) end
end
for _, part in ipairs({req.s or {}, req.l or {}}) do
  for _, line in ipairs(part) do gather(wanted_fixed, wanted_rolls, line) end
end
for _, hold in ipairs(req.h or {}) do
  for _, line in ipairs(hold[4]) do gather(wanted_fixed, wanted_rolls, line) end
end
read_all(wanted_fixed, wanted_rolls)

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
    read[i] = present(line) and level(line) or 0
  end
  answer.l = read
end
if req.d then
  local records = {}
  for i, item in ipairs(req.d) do records[i] = redis.call('HGET', KEYS[item[1]], item[2]) or 0 end
  answer.r = records
end
if req.x then
  local out = {}
  for i, item in ipairs(req.x) do expired(item, i - 1, out) end
  answer.x = out
end
if req.t then answer.t = tally(req.t) end

-- the writes, one command per hash
for index, fields in pairs(fixed_out) do
  if next(fields) then
    local args, states = {}, fixed[index]
    for name in pairs(fields) do
      local state = states[name]
      args[#args + 1] = name
      args[#args + 1] = text(state[1]) .. ' ' .. text(state[2])
    end
    redis.call('HSET', KEYS[index], unpack(args))
  end
end
for index in pairs(roll_out) do roll_write(index) end
for index, seconds in pairs(refresh) do redis.call('EXPIRE', KEYS[index], seconds) end
return cjson.encode(answer)

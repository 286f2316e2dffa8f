#!lua
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
--   P{G}f:<reset second>  fixed windows ending at that second: a hash, field u<counter key> = used and
--                         v<counter key> = reserved (a key is free text: a prefix, not a suffix, keeps
--                         two keys' fields apart); the whole hash expires a day after the end
--   P{G}r:<key>           a rolling window: hash {h = horizon, t = total, o = oldest second,
--                         e = second of the last EXPIRE, <second> = amount}; h is also the marker of a
--                         seeded, empty window
--   P{G}h                 the group's holds: field = hold id, value = the record the client made,
--                         "[expires_us, second reserved, lines]" (for the reaper; never read here)
--   P{G}t:<key>           a tally, hash {<minute> = events}
--
-- A request names each counter of the call once, in `c`: [key index, field, reset] per counter (field
-- 0 for a rolling window); finishes, seeds, holds and level reads refer to counters by their number.
-- Lists are flat (no table per line): decoding the request is much of a call's time.
--
-- Cost: Redis time per decision is what bounds one Redis, so a call reads each hash once (HMGET of every
-- field it needs, before anything else) and writes each once (one HSET at the end). It never encodes
-- JSON for storage: the client sends a hold's record as it is stored, and a finish brings what its hold
-- reserved. The answer is one small MessagePack value.
--
-- Exactness: Lua numbers are doubles, exact only up to 2^53, and amounts reach 10^18. A value below 2^53
-- travels as a MessagePack integer and is computed as a Lua number; a larger one travels and is stored as a
-- decimal string and is computed as two limbs, hi * 10^9 + lo, each far below 2^53, so sums,
-- differences and comparisons up to 2^63 (and beyond) stay exact. A sum that reaches 2^53 moves to
-- limbs. Stored values are decimal strings (`str`). Seconds and microseconds (< 2^53) are numbers.
--
-- Atomicity: a script runs alone in Redis, so one call is one atomic step; a hold touches no counter
-- until every line has been checked. The first line (#!lua, no flags) declares a script that writes and
-- touches only the keys it is given, so Redis refuses it whole before it runs when out of memory or on a
-- replica, never half-way. Needs Redis >= 7.0 (the declaration, EXPIRE ... NX/GT).
--
-- Speed: the request and the answer are MessagePack (cmsgpack decodes a decision's request in two thirds
-- of cjson's time and encodes its answer in two fifths). The paths a decision takes (reading, checking,
-- reserving, finishing, writing back) test for plain Lua numbers inline and call the limb helpers only
-- for values at or above 2^53: a Lua function call is a large part of a line's cost. docs/benchmarks.md
-- has the profile.

local type, tonumber, pairs, next, unpack = type, tonumber, pairs, next, unpack
local format = string.format
local call = redis.call
local req = cmsgpack.unpack(ARGV[1])
local now_s = req.n
local ROLLING = 60
local ROLLING_TTL = 120
local REFRESH = 30  -- a rolling key's lifetime is renewed at most this often (it never drops below 90 s)
local B = 1000000000
local LIM = 9007199254740992  -- 2^53
local CHUNK = 4000  -- arguments per command: Lua's unpack takes at most ~8000

-- HMGET of any number of fields (in commands of CHUNK fields), one list of values
local function hmget(key, names)
  if #names <= CHUNK then return call('HMGET', key, unpack(names)) end
  local values = {}
  for first = 1, #names, CHUNK do
    local part = call('HMGET', key, unpack(names, first, math.min(first + CHUNK - 1, #names)))
    for j = 1, #part do values[first + j - 1] = part[j] end
  end
  return values
end

-- HSET of any number of field-value pairs
local function hset(key, args)
  for first = 1, #args, CHUNK do
    call('HSET', key, unpack(args, first, math.min(first + CHUNK - 1, #args)))
  end
end

-- values: a Lua number when below 2^53, else two limbs {hi, lo} ------------------------------------
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

local function val(x)  -- a request value (number or string) or a stored string
  if type(x) == 'number' then return x end
  if #x < 16 then return tonumber(x) end
  return big(x)
end

local function limbs(x)
  if type(x) == 'table' then return x end
  local hi = math.floor(x / B)
  return {hi, x - hi * B}
end

local function small(hi, lo)
  if hi > -9000000 and hi < 9000000 then return hi * B + lo end
  return {hi, lo}
end

local function add(a, b)
  if type(a) == 'number' and type(b) == 'number' then
    local r = a + b
    if r < LIM and r > -LIM then return r end
  end
  a, b = limbs(a), limbs(b)
  local hi, lo = a[1] + b[1], a[2] + b[2]
  if lo >= B then hi, lo = hi + 1, lo - B end
  return small(hi, lo)
end

local function neg(a)
  if type(a) == 'number' then return -a end
  if a[2] > 0 then return {-a[1] - 1, B - a[2]} end
  return {-a[1], 0}
end

local function sub(a, b)
  if type(a) == 'number' and type(b) == 'number' then
    local r = a - b
    if r < LIM and r > -LIM then return r end
  end
  return add(a, neg(b))
end

local function cmp(a, b)
  if type(a) == 'number' and type(b) == 'number' then
    if a == b then return 0 end
    return a < b and -1 or 1
  end
  a, b = limbs(a), limbs(b)
  if a[1] ~= b[1] then return a[1] < b[1] and -1 or 1 end
  if a[2] ~= b[2] then return a[2] < b[2] and -1 or 1 end
  return 0
end

local function text(x)  -- limbs to a decimal string
  local hi, lo = x[1], x[2]
  if hi < 0 then
    if lo > 0 then hi, lo = -hi - 1, B - lo else hi = -hi end
    return '-' .. text({hi, lo})
  end
  if hi == 0 then return format('%d', lo) end
  return format('%d%09d', hi, lo)
end

local function str(x)  -- what is stored: a decimal string (never Lua's own "1.5e+15")
  if type(x) == 'number' then return format('%d', x) end
  return text(x)
end

local function out(x)  -- what is answered: a number below 2^53 (MessagePack carries it whole), else a string
  if type(x) == 'number' then return x end  -- add and sub keep Lua numbers below 2^53
  return text(x)
end

-- counters ------------------------------------------------------------------------------------------
-- counters[i] is the state of the call's counter i: fixed {fixed = true, u, v, changed}, rolling
-- {h, t, o, e, b = {[second] = amount}, changed = {field = true}, fresh}; false while absent.
-- Each hash is read once (one HMGET of every counter the call names), changes are written at the end.
local C = req.c
local count = #C / 3
local counters = {}
local refresh = {}  -- [counter] = true: a rolling window reserved on or seeded (EXPIRE at the end)
local lifetimes = {}  -- [key index] = seconds: a fixed window's hash, seeded (EXPIRE at the end)

local function read_all()
  local names, numbers = {}, {}  -- per fixed hash (key index): its fields, its counters' numbers
  for i = 1, count do
    local index, field = C[3 * i - 2], C[3 * i - 1]
    if field ~= 0 then
      local fields = names[index]
      if not fields then
        fields = {}
        names[index] = fields
        numbers[index] = {}
      end
      local n = #fields
      fields[n + 1] = 'u' .. field
      fields[n + 2] = 'v' .. field
      local mine = numbers[index]
      mine[#mine + 1] = i
    else
      local raw = call('HMGET', KEYS[index], 'h', 't', 'o', 'e', now_s)
      local h = raw[1]
      if h then
        local t, o, e, here = raw[2], raw[3], raw[4], raw[5]
        local state = {h = tonumber(h), t = #t < 16 and tonumber(t) or big(t), o = o and tonumber(o) or nil,
                       e = e and tonumber(e) or 0, b = {}, changed = {}}
        if here then
          state.b[now_s] = #here < 16 and tonumber(here) or big(here)
        else
          state.b[now_s] = false
        end
        counters[i] = state
      else
        counters[i] = false
      end
    end
  end
  for index, fields in pairs(names) do
    local raw = hmget(KEYS[index], fields)
    local mine = numbers[index]
    for j = 1, #mine do
      local used, reserved = raw[2 * j - 1], raw[2 * j]
      if used then
        if not reserved then reserved = 0
        elseif #reserved < 16 then reserved = tonumber(reserved)
        else reserved = big(reserved) end
        counters[mine[j]] = {fixed = true, u = #used < 16 and tonumber(used) or big(used), v = reserved}
      else
        counters[mine[j]] = false
      end
    end
  end
end

-- writes the changes of one rolling counter so far (before a scan of its hash, and at the end)
local function roll_write(i)
  local state = counters[i]
  if not state or not next(state.changed) then return end
  local args = {}
  for name in pairs(state.changed) do
    local value
    if name == 'h' then value = state.h
    elseif name == 't' then value = str(state.t)
    elseif name == 'o' then value = state.o
    elseif name == 'e' then value = state.e
    else value = str(state.b[name]) end
    args[#args + 1] = name
    args[#args + 1] = value
  end
  hset(KEYS[C[3 * i - 2]], args)
  state.changed = {}
end

-- the amount in one second's bucket, or nil when there is none
local function bucket(state, i, second)
  local value = state.b[second]
  if value == nil then
    if state.fresh then
      value = false
    else
      local raw = call('HGET', KEYS[C[3 * i - 2]], second)
      value = raw and val(raw) or false
    end
    state.b[second] = value
  end
  return value or nil
end

-- memory.py Rolling.prune. Only a rising horizon can drop buckets, and only once it reaches the oldest
-- one, so the scan of the whole hash runs about once a second per key.
local function prune(state, i)
  local horizon = now_s - ROLLING
  if horizon <= state.h then return end
  state.h = horizon
  state.changed.h = true
  if not (state.o and state.o <= horizon) then return end
  roll_write(i)
  local key = KEYS[C[3 * i - 2]]
  local fields = call('HGETALL', key)
  local gone, oldest = {}, nil
  for j = 1, #fields, 2 do
    local second = tonumber(fields[j])  -- nil for h, t, o, e
    if second and second <= horizon then
      gone[#gone + 1] = fields[j]
      state.t = sub(state.t, val(fields[j + 1]))
      state.b[second] = false
    elseif second and (not oldest or second < oldest) then
      oldest = second
    end
  end
  for first = 1, #gone, CHUNK do
    call('HDEL', key, unpack(gone, first, math.min(first + CHUNK - 1, #gone)))
  end
  state.o = oldest
  state.changed.t = true
  if oldest then
    state.changed.o = true
  else
    call('HDEL', key, 'o')
  end
end

-- memory.py Rolling.add; true when it changed something
local function rolling_add(state, i, second, amount)
  if second <= state.h then return false end
  local value = bucket(state, i, second)
  if not value and cmp(amount, 0) == 0 then return false end
  state.b[second] = value and add(value, amount) or amount
  state.t = add(state.t, amount)
  local changed = state.changed
  changed[second] = true
  changed.t = true
  if not state.o or second < state.o then  -- a new oldest bucket (it cannot have existed)
    state.o = second
    changed.o = true
  end
  return true
end

-- memory.py Rolling.retry_after (the key is pruned)
local function rolling_retry_after(state, i, amount, maximum)
  if cmp(amount, maximum) > 0 then return ROLLING end
  roll_write(i)
  local wanted = add(state.t, amount)
  local over = cmp(wanted, maximum) > 0
  local excess = sub(wanted, maximum)
  local fields = call('HGETALL', KEYS[C[3 * i - 2]])
  local buckets = {}
  for j = 1, #fields, 2 do
    local second = tonumber(fields[j])
    if second then buckets[#buckets + 1] = {second, fields[j + 1]} end
  end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  for _, entry in ipairs(buckets) do
    local value = val(entry[2])
    excess = sub(excess, value)
    if cmp(excess, 0) <= 0 and (over or cmp(value, 0) > 0) then
      return math.max(entry[1] + ROLLING - now_s, 1)
    end
  end
  return ROLLING
end

-- the level of counter i, {consumed, reset}, appended to `into`
local function level(i, into)
  local state = counters[i]
  if state.fixed then
    into[#into + 1] = out(add(state.u, state.v))
    into[#into + 1] = C[3 * i]
    return
  end
  prune(state, i)
  into[#into + 1] = out(state.t)
  into[#into + 1] = state.o and state.o + ROLLING or now_s
end

-- reserve: [holds key index, id, index of its record in ARGV, then per line: counter, amount, maximum,
-- blocks (1/0)] (memory.py: reserve_one)
local function reserve(hold)
  local holds, id = KEYS[hold[1]], hold[2]
  -- Claim the id first (one command instead of HEXISTS + HSET); given back unless admitted.
  if call('HSETNX', holds, id, ARGV[hold[3]]) == 0 then return nil end
  local lines = (#hold - 3) / 4
  local missing = {2}
  for l = 1, lines do
    if not counters[hold[4 * l]] then missing[#missing + 1] = l - 1 end
  end
  if #missing > 1 then
    call('HDEL', holds, id)
    return missing
  end
  local overage, refused, consumed = 0, nil, {}
  for l = 1, lines do
    local i = hold[4 * l]
    local state = counters[i]
    local value
    if state.fixed then
      value = add(state.u, state.v)
    else
      prune(state, i)
      value = state.t
    end
    consumed[l] = value
    local amount, maximum = hold[4 * l + 1], hold[4 * l + 2]
    local over
    if type(value) == 'number' and type(amount) == 'number' and type(maximum) == 'number' then
      -- below 2^53 each: value + amount may round, but only where it exceeds any such maximum anyway
      over = maximum >= 0 and amount > 0 and value + amount > maximum
    else
      amount, maximum = val(amount), val(maximum)
      over = cmp(maximum, 0) >= 0 and cmp(amount, 0) > 0 and cmp(add(value, amount), maximum) > 0
    end
    if over then
      if hold[4 * l + 3] == 0 then
        overage = 1
      elseif not refused then
        refused = l
      end
    end
  end
  if refused then
    call('HDEL', holds, id)
    local i = hold[4 * refused]
    local state, retry = counters[i], nil
    if state.fixed then
      retry = math.max(C[3 * i] - now_s, 1)
    else
      retry = rolling_retry_after(state, i, val(hold[4 * refused + 1]), val(hold[4 * refused + 2]))
    end
    local answer = {3, refused - 1, retry}
    for l = 1, lines do level(hold[4 * l], answer) end
    return answer
  end
  -- As memory.py: each line's level is its consumption as checked plus its own amount; the reset is
  -- read after this line's write.
  local answer = {1, overage}
  local n = 2
  for l = 1, lines do
    local i = hold[4 * l]
    local state, amount, value = counters[i], hold[4 * l + 1], consumed[l]
    if type(amount) ~= 'number' then amount = val(amount) end
    answer[n + 1] = out(add(value, amount))
    if state.fixed then
      if amount ~= 0 then  -- limbs are never 0: a request's amount is a string only from 2^53 up
        state.v = add(state.v, amount)
        state.changed = true
      end
      answer[n + 2] = C[3 * i]
    else
      if rolling_add(state, i, now_s, amount) then refresh[i] = true end
      answer[n + 2] = state.o and state.o + ROLLING or now_s
    end
    n = n + 2
  end
  return answer
end

-- settle / release: [holds key index, id, second reserved, actual amounts or 0, then per line: counter,
-- amount reserved]; unknown holds are skipped. A settlement does not refresh a rolling key's lifetime:
-- it only adjusts a bucket its own reservation wrote (and refreshed).
local function finish(item, malformed)
  if call('HDEL', KEYS[item[1]], item[2]) == 0 then return end
  local second, actual, lines = item[3], item[4], (#item - 4) / 2
  if actual ~= 0 and #actual ~= lines then
    malformed[#malformed + 1] = item[2]  -- memory raises ValueError after dropping the hold
    return
  end
  for l = 1, lines do
    local i = item[3 + 2 * l]
    local state = counters[i]
    if state then
      local reserved, spent = item[4 + 2 * l], actual ~= 0 and actual[l] or 0
      if type(reserved) ~= 'number' then reserved = val(reserved) end
      if type(spent) ~= 'number' then spent = val(spent) end
      if state.fixed then
        state.v = sub(state.v, reserved)
        state.u = add(state.u, spent)
        state.changed = true
      else
        rolling_add(state, i, second, sub(spent, reserved))
      end
    end
  end
end

-- seed: [counter, used, lifetime] for a fixed window, [counter, second, amount, ...] for a rolling one;
-- present counters are left alone
local function seed(item)
  local i = item[1]
  if counters[i] then return end
  if C[3 * i - 1] ~= 0 then
    counters[i] = {fixed = true, u = val(item[2]), v = 0, changed = true}
    local index = C[3 * i - 2]
    lifetimes[index] = math.max(lifetimes[index] or 0, item[3])
    return
  end
  local state = {h = 0, t = 0, e = 0, b = {}, changed = {h = true, t = true}, fresh = true}
  counters[i] = state
  for j = 2, #item, 2 do
    if item[j] > now_s - ROLLING then rolling_add(state, i, item[j], val(item[j + 1])) end
  end
  refresh[i] = true
end

-- expired: [holds key index, limit]: the group's holds whose lease ended, oldest first, appended to
-- `into` as id, record, the item's position
local function expired(item, position, into)
  local bound = tonumber(req.u)
  local fields = call('HGETALL', KEYS[item[1]])
  local due = {}
  for j = 1, #fields, 2 do
    local expires = tonumber(string.match(fields[j + 1], '^%[(%d+)'))
    if expires < bound then due[#due + 1] = {expires, fields[j], fields[j + 1]} end
  end
  table.sort(due, function(a, b) return a[1] < b[1] end)
  for j = 1, math.min(#due, item[2]) do
    into[#into + 1] = due[j][2]
    into[#into + 1] = due[j][3]
    into[#into + 1] = position
  end
end

-- tallies (memory.py: tally) -------------------------------------------------------------------------
local TALLY_MINUTES = 60
local function tally(index)
  local key = KEYS[index]
  local minute = math.floor(now_s / 60)
  call('HINCRBY', key, tostring(minute), 1)
  local fields = call('HGETALL', key)
  local total = 0
  for j = 1, #fields, 2 do
    if tonumber(fields[j]) <= minute - TALLY_MINUTES then
      call('HDEL', key, fields[j])
    else
      total = total + tonumber(fields[j + 1])
    end
  end
  call('EXPIRE', key, (TALLY_MINUTES + 1) * 60)
  return total
end

-- one call ------------------------------------------------------------------------------------------
read_all()
local malformed = {}
for _, item in ipairs(req.f) do finish(item, malformed) end
if req.s then for _, item in ipairs(req.s) do seed(item) end end
local verdicts, duplicate = {}, -1
if req.h then
  for j, hold in ipairs(req.h) do
    local verdict = reserve(hold)
    if not verdict then
      duplicate = j - 1
      break
    end
    verdicts[j] = verdict
  end
end
local levels = {}
if req.l then
  for _, i in ipairs(req.l) do
    if counters[i] then
      levels[#levels + 1] = 1
      level(i, levels)
    else
      levels[#levels + 1] = 0
      levels[#levels + 1] = 0
      levels[#levels + 1] = 0
    end
  end
end
local records = {}
if req.d then
  for j, item in ipairs(req.d) do records[j] = call('HGET', KEYS[item[1]], item[2]) or 0 end
end
local due = {}
if req.x then
  for j, item in ipairs(req.x) do expired(item, j - 1, due) end
end
local tallied = req.t and tally(req.t) or 0

-- the writes, one command per hash
local fixed_out = {}
for i = 1, count do
  local state = counters[i]
  if state and state.fixed and state.changed then
    local index = C[3 * i - 2]
    local args = fixed_out[index]
    if not args then
      args = {}
      fixed_out[index] = args
    end
    local field = C[3 * i - 1]
    args[#args + 1] = 'u' .. field
    args[#args + 1] = str(state.u)
    args[#args + 1] = 'v' .. field
    args[#args + 1] = str(state.v)
  elseif state and not state.fixed then
    local renew = refresh[i] and now_s - state.e >= REFRESH
    if renew then
      state.e = now_s
      state.changed.e = true
    end
    roll_write(i)
    -- After the write: EXPIRE does nothing to a key that does not exist yet (a first seed).
    if renew then call('EXPIRE', KEYS[C[3 * i - 2]], ROLLING_TTL) end
  end
end
for index, args in pairs(fixed_out) do hset(KEYS[index], args) end
-- Every counter of a fixed hash ends at the same second; NX sets a first lifetime, GT lengthens it.
for index, seconds in pairs(lifetimes) do
  call('EXPIRE', KEYS[index], seconds, 'NX')
  call('EXPIRE', KEYS[index], seconds, 'GT')
end
-- One MessagePack value: the client parses it in one go (an array reply costs it far more, element by
-- element).
return cmsgpack.pack({verdicts, levels, records, due, tallied, malformed, duplicate})

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
-- The request (ARGV[1]) is one MessagePack array, {n, u, c, f, s, h, l, d, x, t}, a part that is not
-- needed being 0; ARGV[2], ARGV[3], ... are the records of the holds to reserve, stored as they come.
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
--
-- Cost: Redis time per decision is what bounds one Redis, so a call reads each hash once (HMGET of every
-- field it needs, before anything else) and writes each once (one HSET at the end). The request and the
-- answer are flat MessagePack arrays: every table cmsgpack makes or reads costs. The path of a decision
-- (reading, checking, reserving, finishing, writing back) keeps its state in flat arrays indexed by
-- counter, tests for plain Lua numbers inline, and creates no function: everything else (the limb
-- arithmetic, pruning a rolling window, a refusal's retry time, seeds, reads, the reaper's query,
-- tallies) is defined on first use in a call (`rare()`), because creating a Lua function costs about as
-- much as a line's whole check. docs/benchmarks.md has the profile.
--
-- Exactness: Lua numbers are doubles, exact only up to 2^53, and amounts reach 10^18. A value below 2^53
-- travels as a MessagePack integer and is computed as a Lua number; a larger one travels and is stored as a
-- decimal string and is computed as two limbs, hi * 10^9 + lo, each far below 2^53, so sums,
-- differences and comparisons up to 2^63 (and beyond) stay exact. A sum that reaches 2^53 moves to
-- limbs. Stored values are decimal strings. Seconds and microseconds (< 2^53) are numbers.
--
-- Atomicity: a script runs alone in Redis, so one call is one atomic step; a hold touches no counter
-- until every line has been checked. The first line (#!lua, no flags) declares a script that writes and
-- touches only the keys it is given, so Redis refuses it whole before it runs when out of memory or on a
-- replica, never half-way. Needs Redis >= 7.0 (the declaration, EXPIRE ... NX/GT).

local type, tonumber, unpack, format = type, tonumber, unpack, string.format
local call = redis.call
local req = cmsgpack.unpack(ARGV[1])
local now_s = req[1]
local C = req[3]
local ROLLING = 60
local ROLLING_TTL = 120
local REFRESH = 30  -- a rolling key's lifetime is renewed at most this often (it never drops below 90 s)
local LIM = 9007199254740992  -- 2^53
local CHUNK = 4000  -- arguments per command: Lua's unpack takes at most ~8000

-- The state of the call's counters, by number i (1-based, as in `c`):
--   FIXED[i]  true for a fixed window
--   U[i], V[i] used and reserved of a fixed window: a Lua number below 2^53, else limbs {hi, lo};
--             U[i] is false while the counter is absent
--   W[i]      true once a fixed window changed (written at the end)
--   R[i]      a rolling window's state, false while absent: {h, t, o, e, n = the bucket of now_s (false:
--             none), b = other seconds' buckets (made on first need), and what changed: ch, ct, co, ce,
--             cn, cb = {second = true}}
local count = #C / 3
local FIXED, U, V, W, R = {}, {}, {}, {}, {}
local UN, VN = {}, {}  -- a fixed counter's field names
local refresh = {}  -- [counter] = true: a rolling window reserved on or seeded (EXPIRE at the end)
local lifetimes = {}  -- [key index] = seconds: a fixed window's hash, seeded (EXPIRE at the end)

-- rare paths -------------------------------------------------------------------------------------------
local B = 1000000000
local helpers = false
local function rare()
  if helpers then return helpers end
  local h = {}
  helpers = h

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
  h.big = big

  local function val(x)  -- a request value (number or string) or a stored string
    if type(x) == 'number' then return x end
    if #x < 16 then return tonumber(x) end
    return big(x)
  end
  h.val = val

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
  h.add = add

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
  h.sub = sub

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
  h.cmp = cmp

  local function text(x)  -- limbs to a decimal string
    local hi, lo = x[1], x[2]
    if hi < 0 then
      if lo > 0 then hi, lo = -hi - 1, B - lo else hi = -hi end
      return '-' .. text({hi, lo})
    end
    if hi == 0 then return format('%d', lo) end
    return format('%d%09d', hi, lo)
  end
  h.text = text

  -- the amount in one second's bucket of rolling window i (not now_s), or false when there is none
  function h.bucket(st, i, second)
    local b = st.b
    if not b then
      b = {}
      st.b = b
    end
    local value = b[second]
    if value == nil then
      if st.fresh then
        value = false
      else
        local raw = call('HGET', KEYS[C[3 * i - 2]], second)
        value = raw and val(raw) or false
      end
      b[second] = value
    end
    return value
  end

  -- memory.py Rolling.prune, once the horizon passed the oldest bucket: the scan of the whole hash runs
  -- about once a second per key. Changes so far are written first, so the scan sees them.
  function h.prune_scan(st, i)
    h.roll_write(st, i)
    local key = KEYS[C[3 * i - 2]]
    local horizon = st.h
    local fields = call('HGETALL', key)
    local gone, oldest = {}, nil
    for j = 1, #fields, 2 do
      local second = tonumber(fields[j])  -- nil for h, t, o, e
      if second and second <= horizon then
        gone[#gone + 1] = fields[j]
        st.t = sub(st.t, val(fields[j + 1]))
        if second == now_s then st.n = false end
        if st.b then st.b[second] = false end
      elseif second and (not oldest or second < oldest) then
        oldest = second
      end
    end
    for first = 1, #gone, CHUNK do
      call('HDEL', key, unpack(gone, first, math.min(first + CHUNK - 1, #gone)))
    end
    st.o = oldest
    st.ct = true
    if oldest then
      st.co = true
    else
      call('HDEL', key, 'o')
    end
  end

  -- writes the changes of one rolling counter so far (before a scan of its hash, and at the end)
  function h.roll_write(st, i)
    local args, n = {}, 0
    if st.ch then args[1], args[2], n = 'h', st.h, 2 end
    if st.ct then
      local t = st.t
      args[n + 1], args[n + 2], n = 't', type(t) == 'number' and format('%d', t) or text(t), n + 2
    end
    if st.co then args[n + 1], args[n + 2], n = 'o', st.o, n + 2 end
    if st.ce then args[n + 1], args[n + 2], n = 'e', st.e, n + 2 end
    if st.cn then
      local v = st.n
      args[n + 1], args[n + 2], n = now_s, type(v) == 'number' and format('%d', v) or text(v), n + 2
    end
    if st.cb then
      for second in pairs(st.cb) do
        local v = st.b[second]
        args[n + 1], args[n + 2], n = second, type(v) == 'number' and format('%d', v) or text(v), n + 2
      end
    end
    st.ch, st.ct, st.co, st.ce, st.cn, st.cb = false, false, false, false, false, false
    local key = KEYS[C[3 * i - 2]]
    for first = 1, n, CHUNK do
      call('HSET', key, unpack(args, first, math.min(first + CHUNK - 1, n)))
    end
  end

  -- memory.py Rolling.retry_after (the key is pruned)
  function h.rolling_retry_after(st, i, amount, maximum)
    if cmp(amount, maximum) > 0 then return ROLLING end
    h.roll_write(st, i)
    local wanted = add(st.t, amount)
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

  -- memory.py Rolling.add on a second other than now_s, or with limbs; true when it changed something
  function h.rolling_add(st, i, second, amount)
    if second <= st.h then return false end
    local value
    if second == now_s then value = st.n else value = h.bucket(st, i, second) end
    if not value and cmp(amount, 0) == 0 then return false end
    value = value and add(value, amount) or amount
    if second == now_s then
      st.n, st.cn = value, true
    else
      st.b[second] = value
      local cb = st.cb
      if not cb then
        cb = {}
        st.cb = cb
      end
      cb[second] = true
    end
    st.t, st.ct = add(st.t, amount), true
    if not st.o or second < st.o then st.o, st.co = second, true end
    return true
  end

  -- a value as answered: a number below 2^53 (MessagePack carries it whole), else a decimal string
  function h.out(x)
    if type(x) == 'number' then return x end
    return text(x)
  end

  -- the level of counter i, {consumed, reset}, appended to `into` at n; returns the new length
  function h.level(i, into, n)
    if FIXED[i] then
      into[n + 1], into[n + 2] = h.out(add(U[i], V[i])), C[3 * i]
      return n + 2
    end
    local st = R[i]
    if now_s - ROLLING > st.h then h.prune(st, i) end
    into[n + 1], into[n + 2] = h.out(st.t), st.o and st.o + ROLLING or now_s
    return n + 2
  end

  -- memory.py Rolling.prune
  function h.prune(st, i)
    st.h, st.ch = now_s - ROLLING, true
    if st.o and st.o <= st.h then h.prune_scan(st, i) end
  end

  -- seed: [counter, used, lifetime] for a fixed window, [counter, second, amount, ...] for a rolling one;
  -- present counters are left alone
  function h.seed(item)
    local i = item[1]
    if FIXED[i] then
      if U[i] then return end
      U[i], V[i], W[i] = val(item[2]), 0, true
      local index = C[3 * i - 2]
      lifetimes[index] = math.max(lifetimes[index] or 0, item[3])
      return
    end
    if R[i] then return end
    local st = {h = 0, t = 0, o = false, e = 0, n = false, b = {}, ch = true, ct = true, co = false,
                ce = false, cn = false, cb = false, fresh = true}
    R[i] = st
    for j = 2, #item, 2 do
      if item[j] > now_s - ROLLING then h.rolling_add(st, i, item[j], val(item[j + 1])) end
    end
    refresh[i] = true
  end

  -- expired: [holds key index, limit]: the group's holds whose lease ended, oldest first, appended to
  -- `into` as id, record, the item's position
  function h.expired(item, position, into)
    local bound = tonumber(req[2])
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

  -- tallies (memory.py: tally)
  function h.tally(index)
    local key = KEYS[index]
    local minute = math.floor(now_s / 60)
    call('HINCRBY', key, tostring(minute), 1)
    local fields = call('HGETALL', key)
    local total = 0
    for j = 1, #fields, 2 do
      if tonumber(fields[j]) <= minute - 60 then
        call('HDEL', key, fields[j])
      else
        total = total + tonumber(fields[j + 1])
      end
    end
    call('EXPIRE', key, 61 * 60)
    return total
  end

  return h
end

-- reading: each hash once -------------------------------------------------------------------------------
do
  local names, numbers = {}, {}  -- per fixed hash (key index): its fields, its counters' numbers
  for i = 1, count do
    local index, field = C[3 * i - 2], C[3 * i - 1]
    if field ~= 0 then
      FIXED[i] = true
      local fields = names[index]
      if not fields then
        fields = {}
        names[index] = fields
        numbers[index] = {}
      end
      local n = #fields
      local u, v = 'u' .. field, 'v' .. field
      fields[n + 1], fields[n + 2] = u, v
      UN[i], VN[i] = u, v
      local mine = numbers[index]
      mine[#mine + 1] = i
    else
      FIXED[i] = false
      local raw = call('HMGET', KEYS[index], 'h', 't', 'o', 'e', now_s)
      local h = raw[1]
      if h then
        local t, o, e, here = raw[2], raw[3], raw[4], raw[5]
        if #t < 16 then t = tonumber(t) else t = rare().big(t) end
        if here then
          if #here < 16 then here = tonumber(here) else here = rare().big(here) end
        else
          here = false
        end
        -- every field the state will have, made at once (a table that grows is rebuilt)
        R[i] = {h = tonumber(h), t = t, o = o and tonumber(o) or false, e = e and tonumber(e) or 0, n = here,
                b = false, ch = false, ct = false, co = false, ce = false, cn = false, cb = false,
                fresh = false}
      else
        R[i] = false
      end
    end
  end
  for index, fields in pairs(names) do
    local raw
    if #fields <= CHUNK then
      raw = call('HMGET', KEYS[index], unpack(fields))
    else
      raw = {}
      for first = 1, #fields, CHUNK do
        local part = call('HMGET', KEYS[index], unpack(fields, first, math.min(first + CHUNK - 1, #fields)))
        for j = 1, #part do raw[first + j - 1] = part[j] end
      end
    end
    local mine = numbers[index]
    for j = 1, #mine do
      local i, used, reserved = mine[j], raw[2 * j - 1], raw[2 * j]
      if used then
        if #used < 16 then U[i] = tonumber(used) else U[i] = rare().big(used) end
        if not reserved then V[i] = 0
        elseif #reserved < 16 then V[i] = tonumber(reserved)
        else V[i] = rare().big(reserved) end
      else
        U[i] = false
      end
    end
  end
end

-- finishing: settle / release: [holds key index, id, second reserved, actual amounts or 0, then per
-- line: counter, amount reserved]; unknown holds are skipped. A settlement does not refresh a rolling
-- key's lifetime: it only adjusts a bucket its own reservation wrote (and refreshed). ------------------
local malformed = 0
for _, item in ipairs(req[4] ~= 0 and req[4] or {}) do
  if call('HDEL', KEYS[item[1]], item[2]) == 1 then
    local second, actual, lines = item[3], item[4], (#item - 4) / 2
    if actual ~= 0 and #actual ~= lines then
      if malformed == 0 then malformed = {} end
      malformed[#malformed + 1] = item[2]  -- memory raises ValueError after dropping the hold
    else
      for l = 1, lines do
        local i = item[3 + 2 * l]
        local reserved, spent = item[4 + 2 * l], actual ~= 0 and actual[l] or 0
        if FIXED[i] then
          local u, v = U[i], V[i]
          if u then
            local nv, nu
            if type(v) == 'number' and type(reserved) == 'number' then nv = v - reserved end
            if not nv or nv >= LIM or nv <= -LIM then nv = rare().sub(v, rare().val(reserved)) end
            if type(u) == 'number' and type(spent) == 'number' then nu = u + spent end
            if not nu or nu >= LIM or nu <= -LIM then nu = rare().add(u, rare().val(spent)) end
            U[i], V[i], W[i] = nu, nv, true
          end
        else
          local st = R[i]
          if st then
            local d
            if type(reserved) == 'number' and type(spent) == 'number' then d = spent - reserved end
            local here, t = st.n, st.t
            local nb, nt
            if second == now_s and d and second > st.h and type(here) == 'number' and type(t) == 'number' then
              -- the common case: an adjustment of this second's bucket, which exists
              nb, nt = here + d, t + d
              if nb < LIM and nb > -LIM and nt < LIM and nt > -LIM then
                st.n, st.t, st.cn, st.ct = nb, nt, true, true
              else
                nb = nil
              end
            end
            if not nb then
              local hx = rare()
              hx.rolling_add(st, i, second, d or hx.sub(hx.val(spent), hx.val(reserved)))
            end
          end
        end
      end
    end
  end
end

-- seeding ------------------------------------------------------------------------------------------------
if req[5] ~= 0 then
  local seed = rare().seed
  for _, item in ipairs(req[5]) do seed(item) end
end

-- reserving: [holds key index, id, index of its record in ARGV, then per line: counter, amount, maximum,
-- blocks (1/0)] (memory.py: reserve_one). Verdicts are appended to one flat list, each after its length:
-- {1, overage, level, reset, ...}, {2, missing line, ...} or {3, refused line, retry after, level, reset,
-- ...}. ---------------------------------------------------------------------------------------------------
local verdicts, nv, duplicate = 0, 0, -1
if req[6] ~= 0 then
  verdicts = {}
  local consumed = {}
  for j, hold in ipairs(req[6]) do
    local holds, id = KEYS[hold[1]], hold[2]
    -- Claim the id first (one command instead of HEXISTS + HSET); given back unless admitted.
    if call('HSETNX', holds, id, ARGV[hold[3]]) == 0 then
      duplicate = j - 1
      break
    end
    local lines = (#hold - 3) / 4
    local start = nv + 1  -- the verdict's length goes here (set first: the list stays an array)
    verdicts[start] = 0
    local missing = false
    for l = 1, lines do
      local i = hold[4 * l]
      if FIXED[i] then
        if not U[i] then missing = true end
      elseif not R[i] then
        missing = true
      end
    end
    if missing then
      call('HDEL', holds, id)
      verdicts[start + 1] = 2
      nv = start + 1
      for l = 1, lines do
        local i = hold[4 * l]
        if (FIXED[i] and not U[i]) or (not FIXED[i] and not R[i]) then
          nv = nv + 1
          verdicts[nv] = l - 1
        end
      end
      verdicts[start] = nv - start
    else
      local overage, refused = 0, false
      for l = 1, lines do
        local b = 4 * l
        local i = hold[b]
        local value
        if FIXED[i] then
          local u, v = U[i], V[i]
          if type(u) == 'number' and type(v) == 'number' then value = u + v end
          if not value or value >= LIM or value <= -LIM then value = rare().add(u, v) end
        else
          local st = R[i]
          if now_s - ROLLING > st.h then rare().prune(st, i) end
          value = st.t
        end
        consumed[l] = value
        local amount, maximum = hold[b + 1], hold[b + 2]
        local over
        if type(value) == 'number' and type(amount) == 'number' and type(maximum) == 'number' then
          -- below 2^53 each: value + amount may round, but only where it exceeds any such maximum anyway
          over = maximum >= 0 and amount > 0 and value + amount > maximum
        elseif type(value) == 'number' and type(amount) == 'number'
          and (#maximum > 17 or string.byte(maximum, 1) == 45) then
          -- a maximum from 10^17 up (value + amount < 2^54 cannot pass it) or below -2^53 (unlimited)
          over = false
        else
          local hx = rare()
          amount, maximum = hx.val(amount), hx.val(maximum)
          over = hx.cmp(maximum, 0) >= 0 and hx.cmp(amount, 0) > 0 and hx.cmp(hx.add(value, amount), maximum) > 0
        end
        if over then
          if hold[b + 3] == 0 then
            overage = 1
          elseif not refused then
            refused = l
          end
        end
      end
      if refused then
        call('HDEL', holds, id)
        local hx = rare()
        local i = hold[4 * refused]
        local retry
        if FIXED[i] then
          retry = math.max(C[3 * i] - now_s, 1)
        else
          retry = hx.rolling_retry_after(R[i], i, hx.val(hold[4 * refused + 1]), hx.val(hold[4 * refused + 2]))
        end
        verdicts[start + 1], verdicts[start + 2], verdicts[start + 3] = 3, refused - 1, retry
        nv = start + 3
        for l = 1, lines do nv = hx.level(hold[4 * l], verdicts, nv) end
        verdicts[start] = nv - start
      else
        -- As memory.py: each line's level is its consumption as checked plus its own amount; the reset
        -- is read after this line's write.
        verdicts[start + 1], verdicts[start + 2] = 1, overage
        nv = start + 2
        for l = 1, lines do
          local i, amount, value = hold[4 * l], hold[4 * l + 1], consumed[l]
          local level
          if type(value) == 'number' and type(amount) == 'number' then
            level = value + amount
            if level >= LIM or level <= -LIM then level = nil end
          end
          if not level then
            local hx = rare()
            amount = hx.val(amount)
            level = hx.add(value, amount)
          end
          verdicts[nv + 1] = type(level) == 'number' and level or rare().text(level)
          if FIXED[i] then
            if amount ~= 0 then  -- limbs are never 0: a request's amount is a string only from 2^53 up
              local v, nv2 = V[i], nil
              if type(v) == 'number' and type(amount) == 'number' then
                nv2 = v + amount
                if nv2 >= LIM or nv2 <= -LIM then nv2 = nil end
              end
              V[i] = nv2 or rare().add(v, amount)
              W[i] = true
            end
            verdicts[nv + 2] = C[3 * i]
          else
            local st = R[i]
            local here, t = st.n, st.t
            local done = false
            if now_s > st.h and type(amount) == 'number' and type(t) == 'number' then
              if here then
                if type(here) == 'number' then
                  local nb, nt = here + amount, t + amount
                  if nb < LIM and nb > -LIM and nt < LIM and nt > -LIM then
                    st.n, st.t, st.cn, st.ct = nb, nt, true, true
                    refresh[i] = true
                    done = true
                  end
                end
              elseif amount == 0 then
                done = true  -- memory.py: no bucket is made for nothing (and nothing is refreshed)
              elseif amount > 0 and t + amount < LIM then
                st.n, st.t, st.cn, st.ct = amount, t + amount, true, true
                if not st.o or now_s < st.o then st.o, st.co = now_s, true end
                refresh[i] = true
                done = true
              end
            end
            if not done and rare().rolling_add(st, i, now_s, amount) then refresh[i] = true end
            verdicts[nv + 2] = st.o and st.o + ROLLING or now_s
          end
          nv = nv + 2
        end
        verdicts[start] = nv - start
      end
    end
  end
  if nv == 0 then verdicts = 0 end
end

-- reading levels, records, expired holds, a tally -------------------------------------------------------
local levels = 0
if req[7] ~= 0 then
  local hx = rare()
  levels = {}
  local n = 0
  for _, i in ipairs(req[7]) do
    if (FIXED[i] and U[i]) or (not FIXED[i] and R[i]) then
      levels[n + 1] = 1
      n = hx.level(i, levels, n + 1)
    else
      levels[n + 1], levels[n + 2], levels[n + 3] = 0, 0, 0
      n = n + 3
    end
  end
end
local records = 0
if req[8] ~= 0 then
  records = {}
  for j, item in ipairs(req[8]) do records[j] = call('HGET', KEYS[item[1]], item[2]) or 0 end
end
local due = 0
if req[9] ~= 0 then
  local expired = rare().expired
  due = {}
  for j, item in ipairs(req[9]) do expired(item, j - 1, due) end
end
local tallied = req[10] ~= 0 and rare().tally(req[10]) or 0

-- the writes, one command per hash ----------------------------------------------------------------------
local fixed_out = false
for i = 1, count do
  if FIXED[i] then
    if W[i] then
      if not fixed_out then fixed_out = {} end
      local index = C[3 * i - 2]
      local args = fixed_out[index]
      if not args then
        args = {}
        fixed_out[index] = args
      end
      local n, u, v = #args, U[i], V[i]
      args[n + 1] = UN[i]
      args[n + 2] = type(u) == 'number' and format('%d', u) or rare().text(u)
      args[n + 3] = VN[i]
      args[n + 4] = type(v) == 'number' and format('%d', v) or rare().text(v)
    end
  else
    local st = R[i]
    if st then
      local renew = refresh[i] and now_s - st.e >= REFRESH
      if renew then st.e, st.ce = now_s, true end
      if st.ch or st.ct or st.co or st.ce or st.cn or st.cb then
        local key = KEYS[C[3 * i - 2]]
        if not (st.co or st.ce or st.cb) then
          -- the common case, written here: horizon, total, this second's bucket
          local args, n = {}, 0
          if st.ch then args[1], args[2], n = 'h', st.h, 2 end
          if st.ct then
            local t = st.t
            args[n + 1], args[n + 2], n = 't', type(t) == 'number' and format('%d', t) or rare().text(t), n + 2
          end
          if st.cn then
            local v = st.n
            args[n + 1], args[n + 2], n = now_s, type(v) == 'number' and format('%d', v) or rare().text(v), n + 2
          end
          call('HSET', key, unpack(args, 1, n))
        else
          rare().roll_write(st, i)
        end
        -- After the write: EXPIRE does nothing to a key that does not exist yet (a first seed).
        if renew then call('EXPIRE', key, ROLLING_TTL) end
      end
    end
  end
end
if fixed_out then
  for index, args in pairs(fixed_out) do
    local key = KEYS[index]
    for first = 1, #args, CHUNK do
      call('HSET', key, unpack(args, first, math.min(first + CHUNK - 1, #args)))
    end
  end
end
-- Every counter of a fixed hash ends at the same second; NX sets a first lifetime, GT lengthens it.
for index, seconds in pairs(lifetimes) do
  call('EXPIRE', KEYS[index], seconds, 'NX')
  call('EXPIRE', KEYS[index], seconds, 'GT')
end
-- One flat MessagePack value (a part with nothing to say is 0): the client parses it in one go.
return cmsgpack.pack({verdicts, levels, records, due, tallied, malformed, duplicate})

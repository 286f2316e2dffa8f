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
-- redis_counters.c is this script in C (Meterline's Redis module, for Redis one runs oneself): a change
-- here is made there in the same change (the module is built for this file's SHA-1 and refuses others).
--
-- Keys: every key the script touches is in KEYS, and requests name keys by their index there. The
-- client builds the names (storage/redis_counters.py); all keys of one group (an organization) share a
-- hash tag, so with Redis Cluster one call is one slot. Per group G (P = the prefix):
--   P{G}counters  every counter of the group, one hash:
--                   u<reset>:<key>, v<reset>:<key>  a fixed window ending at <reset>: used, reserved
--                   t:<key>, h:<key>, o:<key>, e:<key>  a rolling window: total, horizon (also the
--                                  marker of a seeded, empty window), oldest second, second it was
--                                  last renewed
--                   b<second>:<key>  a rolling window's bucket of that second
--                   s:<key>        the seconds of its buckets, ascending, space-separated (read only
--                                  when a bucket is made or leaves: about once a second per key)
--                   w              no later than the first counter of `windows` is due (absent: none)
--                 The first letter keeps the kinds apart; the key, free text, comes last.
--   P{G}windows   a sorted set: when each counter is to be forgotten (score: a second of the caller's
--                 clock). A fixed window a day past its end once nothing is reserved on it (as memory.py
--                 sweeps; u..., v... deleted), a rolling window 23 to 24 hours after its last admitted
--                 reservation (all its fields deleted; memory.py keeps it, but by then the ledger
--                 holds nothing of its minute). A forgotten counter is missing, and the engine seeds it
--                 again from the ledger. Checked on every call of the group through `w`, which the call
--                 reads anyway.
--   P{G}holds     the group's holds: field = hold id, value = the record the client made,
--                 "[expires_us, second reserved, lines]" (for the reaper; never read here)
--   P{G}t:<key>   a tally, hash {<minute> = events}
-- Redis' own lifetimes (EXPIRE) only catch a group nobody calls any more: counters and windows live as
-- long as their longest-lived counter.
--
-- The request (ARGV[1]) is one MessagePack array, {n, u, g, c, f, s, h, l, d, x, t}, a part that is not
-- needed being 0; ARGV[2], ARGV[3], ... are the records of the holds to reserve, stored as they come.
--   g  per group of the call: the index of its counters hash in KEYS (its windows follow it), a count,
--      then that many field names, 'w' first: the call reads them with one HMGET
--   c  per counter of the call, 5 values: its counters hash's index, the position in g of its first
--      field name, the position of its first value among the values read, its window's end (0 for a
--      rolling window) and its key (0 for a fixed window). A fixed window's names are u, v; a rolling
--      window's t, h, o, e and the bucket of n.
-- Finishes, seeds, holds and level reads refer to counters by their number in c.
--
-- Cost: Redis time per decision is what bounds one Redis. A decision is four commands: one HMGET of the
-- group's counters (every field named by the client, nothing built here), HSETNX and HDEL of holds, one
-- HSET of what changed; about once a second per rolling window a bucket is made or leaves (an HGET of
-- its seconds, an HMGET and HDEL of what leaves), and once an hour it is renewed (ZADD, EXPIRE).
-- The request and the answer are flat MessagePack arrays: every table cmsgpack makes or reads costs. The
-- path of a decision keeps its state in flat arrays indexed by counter, tests for plain Lua numbers
-- inline, and makes only two functions a call (`rare`, `writes`): everything else (the limb arithmetic,
-- pruning a rolling window, a refusal's retry time, seeds, reads, the reaper's query, tallies,
-- forgetting) is defined on first use in a call (`rare()`), because creating a Lua function costs about
-- as much as a line's whole check. docs/benchmarks.md has the profile.
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
local G, C = req[3], req[4]
local ROLLING = 60
local FORGET_ROLLING = 86400  -- a rolling window is forgotten this long after it was last reserved on
local RENEW = 3600  -- ... which it notes at most this often (so it is forgotten 23 to 24 hours after)
local LIM = 9007199254740992  -- 2^53
local CHUNK = 4000  -- arguments per command: Lua's unpack takes at most ~8000

-- The state of the call's counters, by number i (1-based, as in c):
--   FIXED[i]  true for a fixed window
--   U[i], V[i] used and reserved of a fixed window: a Lua number below 2^53, else limbs {hi, lo};
--             U[i] is false while the counter is absent
--   W[i]      true once a fixed window changed (written at the end)
--   R[i]      a rolling window's state, false while absent: {h, t, o, e, n = the bucket of now_s (false:
--             none), b = other seconds' buckets (made on first need), s = the seconds of its buckets
--             (a list, read on first need), and what changed: ch, ct, co, ce, cn, cb = {second = true},
--             cs}
local count = #C / 5
local FIXED, U, V, W, R = {}, {}, {}, {}, {}
local vals  -- the values read, in the order of the names in g
local refresh = {}  -- [counter] = true: a rolling window reserved on or seeded (renewed at the end)
local due_at = {}  -- [counters key index] = w as read (a number) or false; changed ones in due_new
local due_new = {}
local lifetimes = {}  -- [counters key index] = seconds Redis keeps the group's counters at least
local adds = {}  -- [counters key index] = {score, member, ...} for ZADD at the end

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

  local function str(x)  -- what is stored: a decimal string (never Lua's own "1.5e+15")
    if type(x) == 'number' then return format('%d', x) end
    return text(x)
  end

  local function bucket_name(i, second)
    return 'b' .. format('%d', second) .. ':' .. C[5 * i]
  end

  -- the seconds of rolling window i's buckets (a list, ascending), read on first need
  local function seconds(st, i)
    local s = st.s
    if not s then
      s = {}
      if not st.fresh then
        local raw = call('HGET', KEYS[C[5 * i - 4]], 's:' .. C[5 * i])
        if raw then
          for second in string.gmatch(raw, '%d+') do s[#s + 1] = tonumber(second) end
        end
      end
      st.s = s
    end
    return s
  end

  -- the amount in one second's bucket of rolling window i (not now_s), or false when there is none
  local function bucket(st, i, second)
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
        local raw = call('HGET', KEYS[C[5 * i - 4]], bucket_name(i, second))
        value = raw and val(raw) or false
      end
      b[second] = value
    end
    return value
  end

  -- a new bucket's second into the list (appended: it is almost always the newest)
  local function note(st, i, second)
    local s = seconds(st, i)
    local n = #s
    if n == 0 or s[n] < second then
      s[n + 1] = second
    else
      local j = n
      while j >= 1 and s[j] > second do
        s[j + 1] = s[j]
        j = j - 1
      end
      s[j + 1] = second
    end
    st.cs = true
  end

  -- memory.py Rolling.prune once the horizon passed the oldest bucket (about once a second per key)
  local function prune_buckets(st, i)
    local s = seconds(st, i)
    local horizon = st.h
    local gone = 0
    while gone < #s and s[gone + 1] <= horizon do gone = gone + 1 end
    if gone == 0 then return end
    local names, unknown = {}, {}
    for j = 1, gone do
      local second = s[j]
      names[j] = bucket_name(i, second)
      local value
      if second == now_s then value = st.n
      elseif st.b then value = st.b[second] end
      if value == nil then
        unknown[#unknown + 1] = names[j]
      elseif value then
        st.t = sub(st.t, value)
      end
      if st.b then st.b[second] = false end
      if st.cb then st.cb[second] = nil end
    end
    if #unknown > 0 then
      local raw = call('HMGET', KEYS[C[5 * i - 4]], unpack(unknown))
      for j = 1, #raw do
        if raw[j] then st.t = sub(st.t, val(raw[j])) end
      end
    end
    call('HDEL', KEYS[C[5 * i - 4]], unpack(names))
    local rest = {}
    for j = gone + 1, #s do rest[#rest + 1] = s[j] end
    st.s, st.cs, st.ct = rest, true, true
    st.o, st.co = rest[1] or false, true
  end

  -- memory.py Rolling.prune
  function h.prune(st, i)
    st.h, st.ch = now_s - ROLLING, true
    if st.o and st.o <= st.h then prune_buckets(st, i) end
  end

  -- memory.py Rolling.retry_after (the key is pruned)
  function h.rolling_retry_after(st, i, amount, maximum)
    if cmp(amount, maximum) > 0 then return ROLLING end
    local wanted = add(st.t, amount)
    local over = cmp(wanted, maximum) > 0
    local excess = sub(wanted, maximum)
    local s = seconds(st, i)
    local unknown = {}  -- the buckets this call has not read: one HMGET
    for _, second in ipairs(s) do
      if second ~= now_s and not (st.b and st.b[second] ~= nil) and not st.fresh then
        unknown[#unknown + 1] = second
      end
    end
    if #unknown > 0 then
      local names = {}
      for j, second in ipairs(unknown) do names[j] = bucket_name(i, second) end
      local raw = call('HMGET', KEYS[C[5 * i - 4]], unpack(names))
      if not st.b then st.b = {} end
      for j, second in ipairs(unknown) do st.b[second] = raw[j] and val(raw[j]) or false end
    end
    for _, second in ipairs(s) do
      local value
      if second == now_s then value = st.n else value = bucket(st, i, second) end
      value = value or 0
      excess = sub(excess, value)
      if cmp(excess, 0) <= 0 and (over or cmp(value, 0) > 0) then
        return math.max(second + ROLLING - now_s, 1)
      end
    end
    return ROLLING
  end

  -- memory.py Rolling.add on a second other than now_s, or with limbs; true when it changed something
  function h.rolling_add(st, i, second, amount)
    if second <= st.h then return false end
    local value
    if second == now_s then value = st.n else value = bucket(st, i, second) end
    if not value and cmp(amount, 0) == 0 then return false end
    if not value then note(st, i, second) end
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
      into[n + 1], into[n + 2] = h.out(add(U[i], V[i])), C[5 * i - 1]
      return n + 2
    end
    local st = R[i]
    if now_s - ROLLING > st.h then h.prune(st, i) end
    into[n + 1], into[n + 2] = h.out(st.t), st.o and st.o + ROLLING or now_s
    return n + 2
  end

  -- a counter to forget at `at` (ZADD at the end; `w` follows the earliest)
  local function forget_at(i, at, member)
    local index = C[5 * i - 4]
    local list = adds[index]
    if not list then
      list = {}
      adds[index] = list
    end
    list[#list + 1] = at
    list[#list + 1] = member
    local due = due_at[index]
    if not due or at < due then
      due_at[index] = at
      due_new[index] = true
    end
  end
  h.forget_at = forget_at

  -- seed: [counter, used, lifetime] for a fixed window, [counter, second, amount, ...] for a rolling one;
  -- present counters are left alone
  function h.seed(item)
    local i = item[1]
    if FIXED[i] then
      if U[i] then return end
      U[i], V[i], W[i] = val(item[2]), 0, true
      local index, seconds_left = C[5 * i - 4], item[3]
      lifetimes[index] = math.max(lifetimes[index] or 0, seconds_left)
      forget_at(i, now_s + seconds_left, 'f' .. string.sub(G[C[5 * i - 3]], 2))
      return
    end
    if R[i] then return end
    local st = {h = 0, t = 0, o = false, e = 0, n = false, b = {}, s = {}, ch = true, ct = true, co = false,
                ce = false, cn = false, cb = false, cs = true, fresh = true}
    R[i] = st
    for j = 2, #item, 2 do
      if item[j] > now_s - ROLLING then h.rolling_add(st, i, item[j], val(item[j + 1])) end
    end
    refresh[i] = true
  end

  -- writes rolling window i's changes beyond the common ones into `args` (from n); returns its length
  function h.roll_more(st, i, args, n)
    local at = C[5 * i - 3]
    if st.co then
      if st.o then
        args[n + 1], args[n + 2], n = G[at + 2], st.o, n + 2
      else
        call('HDEL', KEYS[C[5 * i - 4]], G[at + 2])
      end
    end
    if st.ce then args[n + 1], args[n + 2], n = G[at + 3], st.e, n + 2 end
    if st.cb then
      for second in pairs(st.cb) do
        args[n + 1], args[n + 2], n = bucket_name(i, second), str(st.b[second]), n + 2
      end
    end
    if st.cs then
      local list = {}
      for j, second in ipairs(st.s) do list[j] = format('%d', second) end
      if #list > 0 then
        args[n + 1], args[n + 2], n = 's:' .. C[5 * i], table.concat(list, ' '), n + 2
      else
        call('HDEL', KEYS[C[5 * i - 4]], 's:' .. C[5 * i])
      end
    end
    return n
  end

  -- forgets the counters of one group whose time has passed, before the call reads them (memory.py:
  -- sweep, which keeps a fixed window while something is reserved on it: such a one is looked at again
  -- an hour later)
  function h.forget(index)
    local key, windows = KEYS[index], KEYS[index + 1]
    local bound = '(' .. format('%d', now_s)
    local due = call('ZRANGEBYSCORE', windows, '-inf', bound)
    local again = {}
    for _, member in ipairs(due) do
      local kind, rest = string.sub(member, 1, 1), string.sub(member, 2)
      if kind == 'f' then
        local reserved = call('HGET', key, 'v' .. rest)
        if reserved and reserved ~= '0' then
          again[#again + 1] = now_s + 3600
          again[#again + 1] = member
        else
          call('HDEL', key, 'u' .. rest, 'v' .. rest)
        end
      else
        local k = string.sub(rest, 2)  -- 'r:<key>'
        local names = {'t:' .. k, 'h:' .. k, 'o:' .. k, 'e:' .. k, 's:' .. k}
        local list = call('HGET', key, 's:' .. k)
        if list then
          for second in string.gmatch(list, '%d+') do names[#names + 1] = 'b' .. second .. ':' .. k end
        end
        for first = 1, #names, CHUNK do
          call('HDEL', key, unpack(names, first, math.min(first + CHUNK - 1, #names)))
        end
      end
    end
    call('ZREMRANGEBYSCORE', windows, '-inf', bound)
    if #again > 0 then call('ZADD', windows, unpack(again)) end
    local first = call('ZRANGE', windows, 0, 0, 'WITHSCORES')
    if first[2] then
      call('HSET', key, 'w', first[2])
      due_at[index] = tonumber(first[2])
    else
      call('HDEL', key, 'w')
      due_at[index] = false
    end
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

-- reading: one HMGET per group (the group's due time first: forgetting comes before reading) ----------
do
  local at, single = 1, G[2] and #G == G[2] + 2
  while at <= #G do
    local index, n = G[at], G[at + 1]
    local raw
    for pass = 1, 2 do
      if n <= CHUNK then
        raw = call('HMGET', KEYS[index], unpack(G, at + 2, at + 1 + n))
      else
        raw = {}
        for first = at + 2, at + 1 + n, CHUNK do
          local part = call('HMGET', KEYS[index], unpack(G, first, math.min(first + CHUNK - 1, at + 1 + n)))
          for j = 1, #part do raw[#raw + 1] = part[j] end
        end
      end
      local due = raw[1] and tonumber(raw[1]) or false
      due_at[index] = due
      if not (due and now_s > due) or pass == 2 then break end
      rare().forget(index)
    end
    if single then
      vals = raw
    else
      vals = vals or {}
      local base = #vals
      for j = 1, n do vals[base + j] = raw[j] end
    end
    at = at + 2 + n
  end
  vals = vals or {}
  for i = 1, count do
    local v = 5 * i
    local p = C[v - 2]
    if C[v] == 0 then
      FIXED[i] = true
      local used, reserved = vals[p], vals[p + 1]
      if used then
        if #used < 16 then U[i] = tonumber(used) else U[i] = rare().big(used) end
        if not reserved then V[i] = 0
        elseif #reserved < 16 then V[i] = tonumber(reserved)
        else V[i] = rare().big(reserved) end
      else
        U[i] = false
      end
    else
      FIXED[i] = false
      local h = vals[p + 1]
      if h then
        local t, o, e, here = vals[p], vals[p + 2], vals[p + 3], vals[p + 4]
        if #t < 16 then t = tonumber(t) else t = rare().big(t) end
        if here then
          if #here < 16 then here = tonumber(here) else here = rare().big(here) end
        else
          here = false
        end
        -- every field the state will have, made at once (a table that grows is rebuilt)
        R[i] = {h = tonumber(h), t = t, o = o and tonumber(o) or false, e = e and tonumber(e) or 0, n = here,
                b = false, s = false, ch = false, ct = false, co = false, ce = false, cn = false, cb = false,
                cs = false, fresh = false}
      else
        R[i] = false
      end
    end
  end
end

-- finishing: settle / release: [holds key index, id, second reserved, actual amounts or 0, then per
-- line: counter, amount reserved]; unknown holds are skipped. A settlement does not renew a rolling
-- window: it only adjusts a bucket its own reservation made (and renewed). ------------------------------
local malformed = 0
if req[5] ~= 0 then
  for _, item in ipairs(req[5]) do
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
              if type(reserved) == 'number' and type(spent) == 'number' then
                d = spent - reserved
                if d >= LIM or d <= -LIM then d = nil end  -- two values below 2^53, a difference beyond
              end
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
end

-- seeding ------------------------------------------------------------------------------------------------
if req[6] ~= 0 then
  local seed = rare().seed
  for _, item in ipairs(req[6]) do seed(item) end
end

-- reserving: [holds key index, id, index of its record in ARGV, then per line: counter, amount, maximum,
-- blocks (1/0)] (memory.py: reserve_one). Verdicts are appended to one flat list, each after its length:
-- {1, overage, level, reset, ...}, {2, missing line, ...} or {3, refused line, retry after, level, reset,
-- ...}. ---------------------------------------------------------------------------------------------------
local verdicts, nv, duplicate = 0, 0, -1
if req[7] ~= 0 then
  verdicts = {}
  local consumed = {}
  for j, hold in ipairs(req[7]) do
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
        if not U[i] then missing = l end
      elseif not R[i] then
        missing = l
      end
      if missing then break end
    end
    if missing then
      call('HDEL', holds, id)
      -- memory.py checks lines in order: the rolling lines before the first missing one were pruned
      for l = 1, missing - 1 do
        local i = hold[4 * l]
        if not FIXED[i] and now_s - ROLLING > R[i].h then rare().prune(R[i], i) end
      end
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
          retry = math.max(C[5 * i - 1] - now_s, 1)
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
              local v, sum = V[i], nil
              if type(v) == 'number' and type(amount) == 'number' then
                sum = v + amount
                if sum >= LIM or sum <= -LIM then sum = nil end
              end
              V[i] = sum or rare().add(v, amount)
              W[i] = true
            end
            verdicts[nv + 2] = C[5 * i - 1]
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
                done = true  -- memory.py: no bucket is made for nothing (and nothing is renewed)
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
if req[8] ~= 0 then
  local hx = rare()
  levels = {}
  local n = 0
  for _, i in ipairs(req[8]) do
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
if req[9] ~= 0 then
  records = {}
  for j, item in ipairs(req[9]) do records[j] = call('HGET', KEYS[item[1]], item[2]) or 0 end
end
local due = 0
if req[10] ~= 0 then
  local expired = rare().expired
  due = {}
  for j, item in ipairs(req[10]) do expired(item, j - 1, due) end
end
local tallied = req[11] ~= 0 and rare().tally(req[11]) or 0

-- the writes: one HSET per group ------------------------------------------------------------------------
local out = {}  -- per counters key index: field, value, ...
local function writes(index)
  local args = out[index]
  if not args then
    args = {}
    out[index] = args
  end
  return args
end
for i = 1, count do
  local index, at = C[5 * i - 4], C[5 * i - 3]
  if FIXED[i] then
    if W[i] then
      local args = writes(index)
      local n, u, v = #args, U[i], V[i]
      args[n + 1] = G[at]
      args[n + 2] = type(u) == 'number' and format('%d', u) or rare().text(u)
      args[n + 3] = G[at + 1]
      args[n + 4] = type(v) == 'number' and format('%d', v) or rare().text(v)
    end
  else
    local st = R[i]
    if st then
      if refresh[i] and now_s - st.e >= RENEW then
        st.e, st.ce = now_s, true
        local hx = rare()
        hx.forget_at(i, now_s + FORGET_ROLLING, 'r:' .. C[5 * i])
        lifetimes[index] = math.max(lifetimes[index] or 0, FORGET_ROLLING + RENEW)
      end
      if st.ch or st.ct or st.cn or st.co or st.ce or st.cb or st.cs then
        local args = writes(index)
        local n = #args
        if st.ct then
          local t = st.t
          args[n + 1], args[n + 2], n = G[at], type(t) == 'number' and format('%d', t) or rare().text(t), n + 2
        end
        if st.ch then args[n + 1], args[n + 2], n = G[at + 1], st.h, n + 2 end
        if st.cn then
          local b = st.n
          args[n + 1], args[n + 2], n = G[at + 4], type(b) == 'number' and format('%d', b) or rare().text(b), n + 2
        end
        if st.co or st.ce or st.cb or st.cs then rare().roll_more(st, i, args, n) end
      end
    end
  end
end
for index in pairs(due_new) do
  local args = writes(index)
  args[#args + 1] = 'w'
  args[#args + 1] = due_at[index]
end
for index, args in pairs(out) do
  local key = KEYS[index]
  for first = 1, #args, CHUNK do
    call('HSET', key, unpack(args, first, math.min(first + CHUNK - 1, #args)))
  end
end
for index, list in pairs(adds) do
  for first = 1, #list, CHUNK do
    call('ZADD', KEYS[index + 1], unpack(list, first, math.min(first + CHUNK - 1, #list)))
  end
end
-- Redis' own lifetime of a group's counters and windows: NX sets a first one, GT lengthens it.
for index, seconds in pairs(lifetimes) do
  for key = index, index + 1 do
    call('EXPIRE', KEYS[key], seconds, 'NX')
    call('EXPIRE', KEYS[key], seconds, 'GT')
  end
end
-- One flat MessagePack value (a part with nothing to say is 0): the client parses it in one go.
return cmsgpack.pack({verdicts, levels, records, due, tallied, malformed, duplicate})

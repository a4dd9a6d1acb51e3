#!lua name=loyaltyd
-- loyaltyd's live board and its read contract for any Redis client
-- (docs/integrating.md, "Live standing"). The daemon loads this library on
-- every master and loads it again when Redis lost it; loyaltyd's own writes
-- and reads call it too, so there is one definition of the board and of a
-- rank.
--
-- library version 4
-- Each deployment has its own library on a Redis it shares with others:
-- `loyaltyd` for the empty key prefix, `loyaltyd_<prefix>` for another (its
-- characters outside [A-Za-z0-9_] as `_`), its functions named after it
-- (`loyaltyd_staging_rank` for the prefix `staging:`); loyaltyd renames
-- them when it loads this text. A daemon never replaces a library of a
-- higher version than its own (two versions of a deployment during an
-- upgrade: the newer one's library stays).
--
-- KEYS[1]: the board's sorted set, `<prefix>leaderboard:live`; KEYS[2]: its
-- base, `<prefix>leaderboard:live:users` (in a Redis Cluster the tag is
-- `{leaderboard:live}`: `<prefix>{leaderboard:live}` and
-- `<prefix>{leaderboard:live}:users`, so every key below shares one slot).
--
-- The layout, for the bytes it costs:
-- * the sorted set holds every user with a positive score, scored by minus
--   the score; a member is the user's key, then the user name: the key is
--   the sign-up time (microseconds + 2^62, 8 bytes big-endian), the id's
--   length in bytes (1 to 8) and the id (big-endian, no leading zero
--   bytes), so that Redis's order among equal scores (the member's bytes,
--   decided within the key, which no other user's shares) is the seed's
--   tie-break: earlier sign-up, then lower id. A page is one ZRANGE: its
--   names are in its members. With names of up to about 16 bytes a member
--   costs no more than a bare 16-byte one (Redis rounds its string up to 32);
-- * each user ever written has an entry in a bucket hash of at most 100
--   users (`<base>:<id without its last two digits>`, field: the last two
--   digits as a number, small enough for Redis's compact listpack
--   encoding): the score's version and the member, `<version> <member>`.
--   The version guards every write (an older score never lands over a newer
--   one); the member finds the user in the set;
-- * the base hash holds `_ready` = 3 once the board is built (3: this
--   layout; a board of another layout reads as not built and is rebuilt).
--
-- Reads answer {-2} while the board is not built: then read the view's
-- answers from PostgreSQL (`loyalty_standing`, `leaderboard_page`); never a
-- wrong rank.

local READY = '3'
local MAX_PAGE = 1000

local function ready(keys)
  return redis.call('HGET', keys[2], '_ready') == READY
end

-- The bucket hash and field of a user id (a decimal string): no
-- arithmetic, so exact for any 64-bit id (Lua's numbers are doubles). The
-- field drops a leading zero, so that listpack stores it as a number.
local function slot(keys, id)
  local b, f = string.sub(id, 1, -3), string.sub(id, -2)
  if b == '' then
    b = '0'
  end
  if #f == 2 and string.byte(f, 1) == 48 then
    f = string.sub(f, 2)
  end
  return keys[2] .. ':' .. b, f
end

-- A bucket entry's version and member.
local function parse(entry)
  local sep = string.find(entry, ' ', 1, true)
  return tonumber(string.sub(entry, 1, sep - 1)), string.sub(entry, sep + 1)
end

-- The user name in a member (what follows its key).
local function member_name(member)
  return string.sub(member, 10 + string.byte(member, 9))
end

local ID_FORMAT = {'>I1', '>I2', '>I3', '>I4', '>I5', '>I6'}

-- The user id of a member, as a decimal string (exact for any 64-bit id:
-- up to 6 bytes a double holds it, longer ones are converted digit by
-- digit).
local function member_id(member)
  local len = string.byte(member, 9)
  if len <= 6 then
    return string.format('%d', (struct.unpack(ID_FORMAT[len], member, 10)))
  end
  local b = {string.byte(member, 10, 9 + len)}
  local digits = {0}
  for i = 1, len do
    local carry = b[i]
    for j = 1, #digits do
      local v = digits[j] * 256 + carry
      digits[j] = v % 10
      carry = math.floor(v / 10)
    end
    while carry > 0 do
      digits[#digits + 1] = carry % 10
      carry = math.floor(carry / 10)
    end
  end
  local out = {}
  for j = #digits, 1, -1 do
    out[#out + 1] = digits[j]
  end
  return table.concat(out)
end

-- The seed's topic right: rank within the top 10 % of ranked users (the
-- rule's home is SQL's topic_right(), sql/leaderboard.sql; this is tested
-- against it).
local function topic_right(rank, ranked)
  if rank <= ranked * 0.1 then
    return 1
  end
  return 0
end

-- ARGV: user id. {rank, score, ranked users, topic right (1 or 0), name}
-- for a ranked user; {0, ranked users} for one not on the board (a score of
-- 0 or less, or no such user); {-2} while the board is not built.
local function rank(keys, args)
  if not ready(keys) then
    return {-2}
  end
  local ranked = redis.call('ZCARD', keys[1])
  local entry = redis.call('HGET', slot(keys, args[1]))
  if not entry then
    return {0, ranked}
  end
  local _, member = parse(entry)
  local r = redis.call('ZRANK', keys[1], member)
  if not r then
    return {0, ranked}
  end
  local score = -tonumber(redis.call('ZSCORE', keys[1], member))
  return {r + 1, score, ranked, topic_right(r + 1, ranked), member_name(member)}
end

-- ARGV: offset (ranks skipped), limit (1 to 1000). {ranked users, then rank,
-- user id (a decimal string), score, name for each entry}; {-2} while the
-- board is not built.
local function page(keys, args)
  local offset, limit = tonumber(args[1]), tonumber(args[2])
  if not offset or offset < 0 or not limit or limit < 1 or limit > MAX_PAGE then
    return redis.error_reply('ERR loyaltyd_page: offset 0 or more, limit 1 to 1000')
  end
  if not ready(keys) then
    return {-2}
  end
  local items = redis.call('ZRANGE', keys[1], offset, offset + limit - 1, 'WITHSCORES')
  local out = {redis.call('ZCARD', keys[1])}
  local k = 1
  for i = 1, #items, 2 do
    local member = items[i]
    out[k + 1] = offset + (i + 1) / 2
    out[k + 2] = member_id(member)
    out[k + 3] = -tonumber(items[i + 1])
    out[k + 4] = member_name(member)
    k = k + 4
  end
  return out
end

-- Applies a write's set changes, each member's last: one ZREM of the
-- members leaving and one ZADD of the rest, per 4,000 values (within what
-- Lua's unpack can pass); a call per member cost about twice as much.
local function apply(set_key, changes)
  local gone, added = {}, {}
  for member, score in pairs(changes) do
    if score then
      added[#added + 1] = score
      added[#added + 1] = member
    else
      gone[#gone + 1] = member
    end
  end
  for i = 1, #gone, 4000 do
    redis.call('ZREM', set_key, unpack(gone, i, math.min(i + 3999, #gone)))
  end
  for i = 1, #added, 4000 do
    redis.call('ZADD', set_key, unpack(added, i, math.min(i + 3999, #added)))
  end
end

-- loyaltyd's write. ARGV: for each user, id, key (the member without the
-- name), score, version, and the name prefixed `=` (or `?` alone when the
-- writer does not know it: the name kept is the board's). Each user is
-- written unless the board holds a newer version (an equal one overwrites:
-- the database is the authority at that version). Answers how many were
-- written.
local function set(keys, args)
  -- A key of another layout (a loyaltyd older than this library, during an
  -- upgrade) is refused whole rather than written as garbage.
  for i = 2, #args, 5 do
    local len = string.byte(args[i], 9)
    if not len or len < 1 or len > 8 or #args[i] ~= 9 + len then
      return redis.error_reply('ERR loyaltyd_set: a key of another board layout (upgrade every loyaltyd)')
    end
  end
  local n = 0
  -- Member -> its new score, or false to take it off.
  local changes = {}
  for i = 1, #args, 5 do
    local id, key, score, version, name = args[i], args[i + 1], tonumber(args[i + 2]), args[i + 3], args[i + 4]
    local b, f = slot(keys, id)
    local entry = redis.call('HGET', b, f)
    local old
    if entry then
      local v
      v, old = parse(entry)
      if v > tonumber(version) then
        key = nil
      end
    end
    if key then
      local member
      if name ~= '?' then
        member = key .. string.sub(name, 2)
      elseif old then
        member = key .. member_name(old)
      else
        member = key
      end
      if old and old ~= member then
        changes[old] = false
      end
      redis.call('HSET', b, f, version .. ' ' .. member)
      -- (The score as its decimal text: no number to format again.)
      changes[member] = score > 0 and '-' .. args[i + 2]
      n = n + 1
    end
  end
  apply(keys[1], changes)
  return n
end

-- The sweep's check. ARGV: (user id, member, score) for each user checked,
-- the member with the name the database has. Answers the ids whose place on
-- the board differs (a wrong score, or a stale name).
local function check(keys, args)
  local bad = {}
  for i = 1, #args, 3 do
    local z = redis.call('ZSCORE', keys[1], args[i + 1])
    local score = tonumber(args[i + 2])
    if score > 0 then
      if (not z) or tonumber(z) ~= -score then
        table.insert(bad, args[i])
      end
    elseif z then
      table.insert(bad, args[i])
    end
  end
  return bad
end

-- Marks the board built (ARGV[1] = 1) or to be built again (0).
local function mark(keys, args)
  if args[1] == '1' then
    return redis.call('HSET', keys[2], '_ready', READY)
  end
  return redis.call('HDEL', keys[2], '_ready')
end

-- Takes users off the board. ARGV: (user id, member) for each.
local function remove(keys, args)
  for i = 1, #args, 2 do
    redis.call('ZREM', keys[1], args[i + 1])
    local b, f = slot(keys, args[i])
    redis.call('HDEL', b, f)
  end
  return #args / 2
end

-- Takes strays off the set. ARGV: (user id, member) for each: the member
-- is removed unless the user's bucket entry names it.
local function unstray(keys, args)
  local n = 0
  for i = 1, #args, 2 do
    local entry = redis.call('HGET', slot(keys, args[i]))
    local current
    if entry then
      local _, member = parse(entry)
      current = member
    end
    if current ~= args[i + 1] then
      n = n + redis.call('ZREM', keys[1], args[i + 1])
    end
  end
  return n
end

redis.register_function{function_name = 'loyaltyd_rank', callback = rank, flags = {'no-writes'}}
redis.register_function{function_name = 'loyaltyd_page', callback = page, flags = {'no-writes'}}
redis.register_function{function_name = 'loyaltyd_check', callback = check, flags = {'no-writes'}}
redis.register_function('loyaltyd_set', set)
redis.register_function('loyaltyd_mark', mark)
redis.register_function('loyaltyd_remove', remove)
redis.register_function('loyaltyd_unstray', unstray)

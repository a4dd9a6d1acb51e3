#!lua name=loyaltyd
-- loyaltyd's live standing, callable from any Redis client (README "Live
-- standing from any language"). The daemon loads this library on every
-- master and loads it again when Redis lost it; loyaltyd's own reads call it
-- too, so there is one definition of a rank.
--
-- KEYS[1]: the board's sorted set, `<prefix>leaderboard:live`; KEYS[2]: its
-- hash, `<prefix>leaderboard:live:users` (in a Redis Cluster the tag is
-- `{leaderboard:live}`: `<prefix>{leaderboard:live}` and
-- `<prefix>{leaderboard:live}:users`). Both functions only read
-- (`FCALL_RO` works) and answer {-2} while the board is not built: then
-- read the view's answers from PostgreSQL (`loyalty_standing`,
-- `leaderboard_page`); never a wrong rank.

local MAX_PAGE = 1000

local function ready(keys)
  return redis.call('HGET', keys[2], '_ready') == '1'
end

-- The user id of a member (sign-up time and id in fixed-width hex) as a
-- decimal string: exact for any 64-bit id (Lua's numbers are doubles).
local function member_id(member)
  local hex = string.sub(member, 17, 32)
  local n = tonumber(hex, 16)
  if n < 9007199254740992 then
    return string.format('%.0f', n)
  end
  local digits = {0}
  for i = 1, #hex do
    local carry = tonumber(string.sub(hex, i, i), 16)
    for j = 1, #digits do
      local v = digits[j] * 16 + carry
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

-- The seed's topic right: rank within the top 10 % of ranked users.
local function topic_right(rank, ranked)
  if rank <= ranked * 0.1 then
    return 1
  end
  return 0
end

-- ARGV: user id. {rank, score, ranked users, topic right (1 or 0)} for a
-- ranked user; {0, ranked users} for one not on the board (a score of 0 or
-- less, or no such user); {-2} while the board is not built.
local function rank(keys, args)
  if not ready(keys) then
    return {-2}
  end
  local ranked = redis.call('ZCARD', keys[1])
  local cur = redis.call('HGET', keys[2], args[1])
  if not cur then
    return {0, ranked}
  end
  local member = string.sub(cur, string.find(cur, ' ') + 1)
  local r = redis.call('ZRANK', keys[1], member)
  if not r then
    return {0, ranked}
  end
  local score = -tonumber(redis.call('ZSCORE', keys[1], member))
  return {r + 1, score, ranked, topic_right(r + 1, ranked)}
end

-- ARGV: offset (ranks skipped), limit (1 to 1000). {ranked users, then rank,
-- user id (a decimal string), score for each entry}; {-2} while the board
-- is not built.
local function page(keys, args)
  local offset, limit = tonumber(args[1]), tonumber(args[2])
  if not offset or offset < 0 or not limit or limit < 1 or limit > MAX_PAGE then
    return redis.error_reply('ERR loyaltyd_page: offset 0 or more, limit 1 to 1000')
  end
  if not ready(keys) then
    return {-2}
  end
  local ranked = redis.call('ZCARD', keys[1])
  local items = redis.call('ZRANGE', keys[1], offset, offset + limit - 1, 'WITHSCORES')
  local out = {ranked}
  for i = 1, #items, 2 do
    out[#out + 1] = offset + (i + 1) / 2
    out[#out + 1] = member_id(items[i])
    out[#out + 1] = -tonumber(items[i + 1])
  end
  return out
end

redis.register_function{function_name = 'loyaltyd_rank', callback = rank, flags = {'no-writes'}}
redis.register_function{function_name = 'loyaltyd_page', callback = page, flags = {'no-writes'}}
